"""One forward + backward of every semfid op per head dim: the driver compute-sanitizer runs.

``benchmarks/gpu_check.sh`` runs it under ``compute-sanitizer --tool memcheck`` and ``--tool
racecheck``: out-of-bounds or misaligned accesses and shared-memory races in semfid's kernels show up
as sanitizer errors. The case is small (N=130 queries: one full and one partial query block of every
tile size; M=77 text tokens) so the instrumented run takes seconds. On a CPU (``--device cpu``) it
runs the same calls without a sanitizer: a smoke test of the driver itself.

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/sanitizer_case.py
    python benchmarks/sanitizer_case.py --device cpu --backend torch
"""

from __future__ import annotations

import argparse
import sys
from typing import List

import torch

HEAD_DIMS = {"triton": [40, 64, 80, 160], "cuda": [40, 64, 80, 128, 160]}
DEFAULT_HEAD_DIMS = [40, 64, 80, 160]
N_QUERIES, N_KEYS, HEADS, BATCH = 130, 77, 2, 2
TOKENS = [1, 5, 76]  # first, middle and last key


def views(n: int, heads: int, head_dim: int, device, dtype) -> torch.Tensor:
    """[B, H, n, D] as diffusers hands it over: a transposed view of [B, n, H·D], requiring grad."""
    base = torch.randn(BATCH, n, heads * head_dim, device=device, dtype=dtype, requires_grad=True)
    return base.view(BATCH, n, heads, head_dim).transpose(1, 2)


def run_case(backend: str, head_dim: int, device: torch.device, dtype: torch.dtype) -> str:
    """Forward + backward of subject_attention (reference not detached: every gradient path),
    cross_attention with per-head maps and attention_maps. Returns a one-line description."""
    import semfid

    q, k, v, k_ref = (views(n, HEADS, head_dim, device, dtype) for n in (N_QUERIES, N_KEYS, N_KEYS, N_KEYS))
    bias = torch.zeros(BATCH, N_KEYS, device=device)
    bias[1, -7:] = float("-inf")  # padded prompt: masked keys in one row
    out, loss = semfid.subject_attention(q, k, v, k_ref, tokens=TOKENS, attn_bias=bias,
                                         detach_reference=False, backend=backend)
    out2, maps = semfid.cross_attention(q, k, v, select=TOKENS, head_reduce="none", backend=backend)
    maps_only = semfid.attention_maps(q, k_ref, select=TOKENS, backend=backend)
    total = (out.float().square().mean() + loss.sum() + out2.float().mean() + maps.sum()
             + maps_only.square().sum())
    total.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    finite = bool(torch.isfinite(total).item())
    return f"{backend} D={head_dim}: fwd+bwd of 3 ops done (loss finite: {finite})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", nargs="+", default=None,
                   help="semfid backends (default: triton and cuda where available)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    args = p.parse_args(argv)
    import semfid

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but this torch sees no CUDA GPU", file=sys.stderr)
        return 2
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32  # the CPU smoke run checks the driver, not half precision
    backends: List[str] = args.backend or [b for b in ("triton", "cuda") if b in semfid.available_backends()]
    if not backends:
        print("no GPU backend of semfid is available here: nothing to check")
        return 0
    failures = 0
    for backend in backends:
        for head_dim in HEAD_DIMS.get(backend, DEFAULT_HEAD_DIMS):
            torch.manual_seed(head_dim)
            try:
                print(run_case(backend, head_dim, device, dtype), flush=True)
            except ValueError as exc:  # the dispatcher says this backend does not take the case
                print(f"{backend} D={head_dim}: not supported: {str(exc).splitlines()[0]}", flush=True)
            except Exception as exc:  # noqa: BLE001 - report every case, fail at the end
                failures += 1
                print(f"{backend} D={head_dim}: FAILED: {type(exc).__name__}: {exc}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
