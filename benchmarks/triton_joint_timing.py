"""GPU timings of the key-blocked Triton kernels on DiT layers at 1024 px (B = 1), one table.

For each layer (Flux.1 [512 text, 4096 image] keys at 24 x 128, SD3 [image, 333 text] at 24 x 64,
PixArt-Σ 300-key cross-attention at 16 x 72): forward + backward of

* ``sdpa_plain``    — F.scaled_dot_product_attention alone (no maps: the floor),
* ``maps_triton``   — semfid.cross_attention with 4 selected text columns over the image queries,
* ``subject_triton`` / ``subject_sdpa`` — semfid.subject_attention (reference replacing the text
  keys, detached), on the Triton kernels and on the sdpa backend.

Each is checked for finite outputs before timing; CUDA events, median of ``--reps`` runs. Needs a
CUDA GPU (exits 0 with a message otherwise). ``benchmarks/gpu_check.sh`` runs it.

Usage: ``python benchmarks/triton_joint_timing.py [--dtype bfloat16] [--reps 20] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from semfid.testing.dit_layers import DIT_LAYERS, dit_layer


def _median_ms(fn: Callable[[], None], reps: int) -> float:
    for _ in range(3):
        fn()
    times: List[float] = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _fwd_bwd(make_outputs):
    def run():
        outs = make_outputs()
        total = sum(o.float().sum() for o in outs if o.requires_grad)
        total.backward()
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("triton_joint_timing: no CUDA GPU, nothing timed")
        return 0
    import semfid

    dtype = getattr(torch, args.dtype)
    rows_out: List[Dict[str, object]] = []
    print(f"{'layer':<12} {'impl':<15} {'fwd+bwd ms':>10}   ({torch.cuda.get_device_name()}, {args.dtype})")
    for layer in DIT_LAYERS:
        name = f"{layer}_1024"
        q, k, v, k_ref, tokens, rows, seg = dit_layer(layer, dtype)
        impls = {
            "sdpa_plain": lambda: (F.scaled_dot_product_attention(q, k, v),),
            "maps_triton": lambda: semfid.cross_attention(q, k, v, select=tokens, map_queries=rows,
                                                          backend="triton"),
        }
        for backend in ("triton", "sdpa"):
            impls[f"subject_{backend}"] = (lambda b=backend: semfid.subject_attention(
                q, k, v, k_ref, tokens=tokens, map_queries=rows, ref_segment=seg, backend=b))
        for impl, make in impls.items():
            try:
                outs = make()
                if not all(torch.isfinite(o).all() for o in outs):
                    raise RuntimeError("non-finite output")
                ms = _median_ms(_fwd_bwd(make), args.reps)
                print(f"{name:<12} {impl:<15} {ms:>10.3f}")
                rows_out.append(dict(layer=name, impl=impl, ms=ms, dtype=args.dtype))
            except Exception as exc:  # report and go on: one failing impl must not hide the rest
                print(f"{name:<12} {impl:<15} FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                rows_out.append(dict(layer=name, impl=impl, error=f"{type(exc).__name__}: {exc}"[:300]))
            q.grad = k.grad = v.grad = k_ref.grad = None
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows_out, f, indent=1)
    return 1 if any("error" in r for r in rows_out) else 0


if __name__ == "__main__":
    sys.exit(main())
