"""Which key-blocked Triton launch fails on a GPU, and how: each DiT-layer case in its own process.

The H200 run of 2026-12-04 hit "an illegal memory access" in the key-blocked kernels (SD3's
[image, 333 text] subject op, Flux's maps) while Flux's subject op passed. This driver runs every
case (op x layer x dtype, forward and forward + backward apart) in a fresh process, so one fault
does not poison the next, syncing after each pass; a failing case is run again under
``compute-sanitizer --tool memcheck`` (where installed), whose first report names the kernel and
the address. ``--tiles`` overrides the key-blocked forward's launch tiles (BLOCK_M, BLOCK_N, num_warps)
to test a fix. Needs a CUDA GPU.

    python benchmarks/triton_joint_probe.py                   # every case, sanitizer on failures
    python benchmarks/triton_joint_probe.py --case sd3-subject-float16-fwd   # one case, in-process
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from typing import List, Optional, Tuple

import torch

from semfid.testing.dit_layers import DIT_LAYERS, dit_layer

# "mapsrun1": the maps call of the first H200 run's timing script, 1-D select [1, 2, 5, 9] past the
# text start, which faulted there once on Flux (bf16) and was never reproduced
OPS = ("maps", "mapsrun1", "subject")
DTYPES = ("float16", "bfloat16")
PASSES = ("fwd", "bwd")


def case_names() -> List[str]:
    return [f"{layer}-{op}-{dt}-{ps}" for layer in DIT_LAYERS for op in OPS for dt in DTYPES for ps in PASSES]


def _override_tiles(spec: str) -> None:
    import semfid.kernels._joint as joint

    block_m, block_n, warps = (int(x) for x in spec.split(","))
    original = joint.tiles

    def tiles(dtype, head_dim, num_selected, backward, *args, **kwargs):
        if backward:  # the forward launches only
            return original(dtype, head_dim, num_selected, backward, *args, **kwargs)
        return block_m, block_n, warps

    joint.tiles = tiles
    for mod in ("joint_fwd", "joint_bwd", "joint_bwd_dkdv", "joint_bwd_prep"):
        module = sys.modules.get(f"semfid.kernels.{mod}")
        if module is not None and hasattr(module, "tiles"):
            module.tiles = tiles


def run_case(name: str, tiles: Optional[str]) -> str:
    import semfid
    import semfid.kernels.joint_bwd  # noqa: F401  (imported so --tiles reaches every module)
    import semfid.kernels.joint_fwd  # noqa: F401

    if tiles:
        _override_tiles(tiles)
    layer, op, dt, ps = name.split("-")
    q, k, v, k_ref, tokens, rows, seg = dit_layer(layer, getattr(torch, dt))
    if op in ("maps", "mapsrun1"):
        select = tokens if op == "maps" else int(seg[0] if seg else 0) + torch.tensor([1, 2, 5, 9], device="cuda")
        outs = semfid.cross_attention(q, k, v, select=select, map_queries=rows, backend="triton")
    else:
        outs = semfid.subject_attention(q, k, v, k_ref, tokens=tokens, ref_tokens=tokens, map_queries=rows,
                                        ref_segment=seg, detach_reference=False, return_maps=True,
                                        backend="triton")
    torch.cuda.synchronize()
    finite = all(bool(torch.isfinite(o).all()) for o in outs)
    if ps == "bwd":
        total = sum(o.float().sum() for o in outs if o.requires_grad)
        grads = torch.autograd.grad(total, [t for t in (q, k, v, k_ref) if t.requires_grad], allow_unused=True)
        torch.cuda.synchronize()
        finite = finite and all(g is None or bool(torch.isfinite(g).all()) for g in grads)
    return f"ok (finite: {finite})"


def _child(name: str, tiles: Optional[str], sanitizer: bool, timeout: int) -> Tuple[bool, str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--case", name] + (["--tiles", tiles] if tiles else [])
    if sanitizer:
        cmd = ["compute-sanitizer", "--tool", "memcheck", "--show-backtrace", "no", "--print-limit", "3"] + cmd
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout} s"
    text = (res.stdout + res.stderr).strip().splitlines()
    keep = [line for line in text if "Warning" not in line and "warn(" not in line]
    ok = res.returncode == 0 and any(line.startswith("ok") for line in keep)
    report = [line for line in keep if line.startswith("=========")][:24]  # the sanitizer's own lines
    return ok, "\n    ".join(report + keep[-(14 if not report else 6):])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", help="run one case in this process: " + ", ".join(case_names()[:2]) + ", ...")
    p.add_argument("--only", nargs="*", default=None, help="substrings: run the matching cases only")
    p.add_argument("--tiles", default=None, help="BLOCK_M,BLOCK_N,num_warps for the key-blocked forward launches")
    p.add_argument("--no-sanitizer", action="store_true")
    p.add_argument("--timeout", type=int, default=60)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("triton_joint_probe: no CUDA GPU, nothing run")
        return 0
    if args.case:
        print(run_case(args.case, args.tiles), flush=True)
        return 0
    names = [n for n in case_names() if not args.only or any(s in n for s in args.only)]
    sanitizer = shutil.which("compute-sanitizer") is not None and not args.no_sanitizer
    failed = 0
    for name in names:
        ok, text = _child(name, args.tiles, False, args.timeout)
        print(f"{name:<28} {'ok' if ok else 'FAILED'}" + ("" if ok else f"\n    {text}"), flush=True)
        if not ok:
            failed += 1
            if sanitizer and failed == 1:  # the first fault only: memcheck runs ~10-100x slower
                _, report = _child(name, args.tiles, True, 60)
                print(f"  memcheck of {name}:\n    {report}", flush=True)
    print(f"{len(names) - failed} of {len(names)} cases ok" + (f" (tiles {args.tiles})" if args.tiles else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
