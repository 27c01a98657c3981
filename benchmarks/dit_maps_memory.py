"""Peak memory of capturing Flux text-token maps: semfid against materialised joint maps.

One Flux transformer call (the structural twin of Flux.1 dev by default: 19 double- and 38
single-stream blocks, tiny widths; ``--size full`` for the real widths on a GPU-sized machine) with
``S`` text tokens captured in every layer, three ways, each in a fresh child process:

* ``floor``     the call with semfid installed and no block active (stock attention);
* ``semfid``    ``ctl.capture(tokens)``: the selected columns of the joint softmax only;
* ``explicit``  the attention-map-diffusers way: every layer materialises ``softmax(q kᵀ)``
                [B, H, N, M] over the joint key set, multiplies it by v and keeps the slice
                [image queries, selected text keys] (head mean), as its processor does.

Reported per way: peak resident memory of the child (``ru_maxrss``, CPU) or peak CUDA memory,
the maps kept, and the extra peak over ``floor``. Both capture ways keep the same maps (checked).

    python benchmarks/dit_maps_memory.py --res 1024 --text 512 --tokens 4
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch


def _explicit_joint_attention(name, query, key, value, *, scale, attn_bias, plan, call, text, image,
                              ref_keys=None):
    """The materialising baseline, in semfid's processor slot (same inputs, same records)."""
    logits = query.float() @ key.float().transpose(-1, -2) * scale  # [B, H, N, M]
    if attn_bias is not None:
        logits = logits + attn_bias
    probs = logits.softmax(dim=-1)
    out = (probs @ value.float()).to(query.dtype)
    for item in plan.captures:
        cols = item.tokens.index + text[0]  # [B, S]
        sl = probs[:, :, image[0]:image[1]]
        maps = torch.gather(sl, 3, cols[:, None, None, :].expand(-1, sl.shape[1], sl.shape[2], -1))
        call.record(item, name, maps.mean(dim=1))
    return out


def _child(way: str, size: str, res: int, text: int, tokens: int, device: str) -> dict:
    sys.path.insert(0, "tests")
    from _dit_calls import flux_ids

    from semfid.diffusers import install
    from semfid.diffusers.families import flux as flux_family
    from semfid.testing.dits import dit_from_config

    torch.manual_seed(0)
    model = dit_from_config("flux_dev_transformer" + ("_twin" if size == "twin" else "")).to(device).eval()
    side = res // 16  # 8x VAE, 2x2 packing
    width = model.config.in_channels
    kw = dict(hidden_states=torch.randn(1, side * side, width, device=device),
              encoder_hidden_states=torch.randn(1, text, model.config.joint_attention_dim, device=device),
              pooled_projections=torch.randn(1, model.config.pooled_projection_dim, device=device),
              timestep=torch.tensor([0.5], device=device), img_ids=flux_ids(side, side).to(device),
              txt_ids=torch.zeros(text, 3, device=device), guidance=torch.tensor([3.5], device=device))
    ctl = install(model)
    if way == "explicit":
        flux_family.joint_attention = _explicit_joint_attention
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    kept = 0
    checksum = 0.0
    with torch.no_grad():
        if way == "floor":
            model(**kw)
        else:
            with ctl.capture(list(range(tokens))) as rec:
                model(**kw)
            kept = sum(m.numel() * m.element_size() for m in rec.maps.values())
            checksum = float(sum(m.double().sum() for m in rec.maps.values()))
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"way": way, "peak_bytes": peak, "maps_bytes": kept, "checksum": checksum,
            "image_tokens": side * side, "keys": side * side + text}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("twin", "full"), default="twin")
    p.add_argument("--res", type=int, default=1024, help="image side in pixels (latent / 8, packed 2x2)")
    p.add_argument("--text", type=int, default=512, help="T5 tokens (Flux.1 dev: 512)")
    p.add_argument("--tokens", type=int, default=4, help="text tokens captured")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.size, args.res, args.text, args.tokens, args.device)))
        return 0
    rows = []
    for way in ("floor", "semfid", "explicit"):
        cmd = [sys.executable, __file__, "--child", way, "--size", args.size, "--res", str(args.res),
               "--text", str(args.text), "--tokens", str(args.tokens), "--device", args.device]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    floor = rows[0]["peak_bytes"]
    sem, exp = rows[1], rows[2]
    if abs(sem["checksum"] - exp["checksum"]) > 1e-3 * max(1.0, abs(exp["checksum"])):
        raise SystemExit(f"semfid and explicit maps differ: {sem['checksum']} vs {exp['checksum']}")
    mib = 2 ** 20
    print(f"Flux {args.size}, {args.res} px: {rows[0]['image_tokens']} image tokens, {rows[0]['keys']} keys, "
          f"{args.tokens} tokens captured in 57 layers, {args.device}")
    print("| way | peak MiB | over floor MiB | maps kept MiB |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['way']} | {r['peak_bytes'] / mib:.0f} | {(r['peak_bytes'] - floor) / mib:.0f} | "
              f"{r['maps_bytes'] / mib:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
