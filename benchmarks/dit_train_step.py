"""One DiT training step with the subject-wise loss in every joint layer: Flux and SD3 twins.

Three ways of running the same step (denoising MSE + 0.003 · subject loss, backward into the
transformer's weights), on the Flux.1-dev twin (19 double + 38 single blocks) and the SD3.5-medium
twin (24 joint blocks), at a patch grid of ``--side`` × ``--side`` with ``--text`` text tokens:

* ``floor``     semfid installed, no block: the stock step (SDPA / dispatch_attention_fn);
* ``semfid``    ``ctl.subject_loss``: one no-grad reference forward, then the fused op per layer;
* ``explicit``  the same reference forward, then per layer an explicit joint softmax for the
                target and for the reference key set ([B, H, N, M] each, kept for backward).

Reported: median step time (meaningless on a loaded machine: the load average is printed beside
it) and the bytes autograd saves for backward during the forward (deterministic). The loss values
of ``semfid`` and ``explicit`` are checked equal first.

    python benchmarks/dit_train_step.py --models flux sd3 --side 16 --text 64 --steps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from _dit_calls import make_call, twin  # noqa: E402

from semfid.diffusers import install  # noqa: E402
from semfid.diffusers.families import flux as flux_family, sd3 as sd3_family  # noqa: E402
from semfid.diffusers.families.reference import reference_for  # noqa: E402
from semfid.testing.memory import SavedBytes  # noqa: E402

TOKENS, REF_TOKENS = [1, 2], [1, 3]


def explicit_joint_attention(name, query, key, value, *, scale, attn_bias, plan, call, text, image,
                             ref_keys=None):
    """The explicit baseline in semfid's slot: full softmaxes for the target and the reference."""
    item = plan.loss
    k_ref = reference_for(name, ref_keys, query.shape[0])
    k_r = torch.cat([key[:, :, :text[0]], k_ref, key[:, :, text[1]:]], dim=2)
    p_t = (query @ key.transpose(-1, -2) * scale).softmax(-1)  # [B, H, N, M]
    with torch.no_grad():
        p_r = (query @ k_r.transpose(-1, -2) * scale).softmax(-1)
    out = p_t @ value
    rows = slice(image[0], image[1])
    a_t = p_t[:, :, rows][..., [text[0] + t for t in TOKENS]].mean(1)
    a_r = p_r[:, :, rows][..., [text[0] + t for t in REF_TOKENS]].mean(1)
    call.record(item, name, (a_t - a_r).square().mean(dim=(1, 2)), None)
    return out


def _step(model, ctl, kw, ref, way):
    if way == "floor":
        pred = model(**kw).sample
        loss = pred.square().mean()
        extra = None
    else:
        with ctl.subject_loss(ref, TOKENS, ref_tokens=REF_TOKENS) as rec:
            pred = model(**kw).sample
        extra = rec.loss
        loss = pred.square().mean() + 0.003 * extra.sum()
    return loss, extra


def run(family: str, side: int, text: int, steps: int):
    torch.manual_seed(0)
    model = twin(family).train()
    kw = make_call(family, batch=1, text=text, h=side, w=side)
    ref = torch.randn(1, text, 32)
    ctl = install(model)
    module = flux_family if family == "flux" else sd3_family
    stock = module.joint_attention
    rows, losses = [], {}
    for way in ("floor", "semfid", "explicit"):
        module.joint_attention = explicit_joint_attention if way == "explicit" else stock
        try:
            times = []
            with SavedBytes() as saved:
                loss, extra = _step(model, ctl, kw, ref, way)
            loss.backward()
            losses[way] = extra
            for _ in range(steps):
                model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                loss, _ = _step(model, ctl, kw, ref, way)
                loss.backward()
                times.append(time.perf_counter() - t0)
        finally:
            module.joint_attention = stock
        rows.append((way, statistics.median(times), saved.nbytes))
    if not torch.allclose(losses["semfid"], losses["explicit"], rtol=1e-4, atol=1e-9):
        raise SystemExit(f"{family}: semfid and explicit losses differ: {losses['semfid']} vs {losses['explicit']}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=("flux", "sd3"), default=["flux", "sd3"])
    p.add_argument("--side", type=int, default=16, help="patch grid side (16: 256 px Flux / SD3)")
    p.add_argument("--text", type=int, default=64, help="text tokens")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; {args.side}x{args.side} patches, "
          f"{args.text} text tokens, batch 1")
    print("| model | way | step s (median) | over floor | saved for backward MiB |")
    print("|---|---|---|---|---|")
    for family in args.models:
        rows = run(family, args.side, args.text, args.steps)
        floor = rows[0][1]
        for way, t, nbytes in rows:
            print(f"| {family} twin | {way} | {t:.3f} | {t / floor:.2f}x | {nbytes / 2**20:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
