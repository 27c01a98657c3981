"""Compile every Triton kernel configuration for sm_80 / sm_90 without a GPU (``--compile-check``).

Lives beside the kernels it verifies (``python -m semfid.kernels.compile_check``; ``python -m
semfid.info --compile-check`` calls it) and imports only torch and triton. For the xattn forward and
backward kernels, the one-pass subject kernels (with S in {1, 16, 77} selected tokens) and the
split-sum kernel (and the key-blocked kernels of joint key sets, :mod:`.compile_joint`: a Flux
layer's layout, head dims 64/72/128, S in {4, 77}, every op mode, all gated), every SD-relevant head dim (40, 64, 80, 160 and 256), dtype
(fp16, bf16, fp32), mode (forward: target pass / reference maps-only pass / per-head maps / plain;
backward: output+maps / maps-only / output-only) and every autotune config the autotuner may pick
for 77 keys at the SD query counts (64 .. 4096), this builds a cubin with
``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32))`` and
prints the registers per thread, spilled bytes and shared memory. The configs come from the kernels'
own ``early_config_prune`` (``semfid.kernels._utils.candidate_configs``) applied to each launch's
arguments, so the check compiles exactly what the autotuner can choose from, no more, no less.
The compile runs in a child process without ``TRITON_INTERPRET`` (the interpreter would replace
the compiler). Exit status: 0 when every config compiles and no fp16/bf16 config spills registers,
1 otherwise; fp32 configs that spill are listed as a warning (exact-fp32 dots hold both operands in
registers, and the SD workloads this gate protects run in fp16/bf16).

Usage: ``python -m semfid.kernels.compile_check [--arch 80,90] [--head-dims 40,64,80,160,256]
[--dtypes fp16,bf16,fp32] [--quick] [--only REGEX] [-j N]`` (``--quick``: only the target-pass /
output+maps modes; ``--only``: configs whose printed label matches; ``-j``: parallel compiles).
Identical specialisations (same kernel, signature, constexprs, arch and config) compile once.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

from .compile_joint import JOINT_HEAD_DIMS, JOINT_MODES, joint_jobs
from .compile_sd import (NUM_KEYS, NUM_SELECTED, QUERY_BUCKETS, SD_HEAD_DIMS, SD_HEADS, SUBJECT_SELECTED, _TYPES,
                         subject_jobs)

# flags per kernel mode
FWD_MODES = {
    "target": dict(HAS_V=True, HAS_SEL=True, MEAN_HEADS=True),
    "reference": dict(HAS_V=False, HAS_SEL=True, MEAN_HEADS=True),
    "per_head": dict(HAS_V=True, HAS_SEL=True, MEAN_HEADS=False),
    "plain": dict(HAS_V=True, HAS_SEL=False, MEAN_HEADS=False),
}
BWD_MODES = {
    "out+maps": dict(HAS_DO=True, HAS_G=True),
    "maps": dict(HAS_DO=False, HAS_G=True),
    "out": dict(HAS_DO=True, HAS_G=False),
}


#: Modes whose fp16/bf16 spills fail the check: the one-pass subject op with head-mean maps, the
#: path SeFi-IDE training takes on every cross-attention layer. Other modes' spills are reported.
GATED_MODES = ("subj_mean", "subj_mapr") + JOINT_MODES

_SIG_DTYPES = {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32",
               "torch.int64": "i64"}



def _specialize(fn, args: Sequence, constexprs: Dict[str, object], target):
    """Signature, constexprs and attrs as triton's launcher derives them from actual arguments:
    tensors become ``*dtype`` pointers (16-byte aligned), ints equal to 1 become constants, ints
    divisible by 16 get ``tt.divisibility = 16``, floats are fp32."""
    from triton.compiler.compiler import make_backend

    backend = make_backend(target)
    names = fn.arg_names
    signature, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(names):
        if name in consts:
            signature[name] = "constexpr"
            continue
        value = args[i]
        if hasattr(value, "dtype"):
            signature[name] = "*" + _SIG_DTYPES[str(value.dtype)]
            attrs[(i,)] = backend.parse_attr("D")
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name] = "constexpr"
            consts[name] = 1
        else:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = backend.parse_attr("D")
    return signature, consts, attrs


def _sd_tensors(head_dim: int, dtype: str, mean: bool, with_v: bool, with_sel: bool):
    """Meta tensors in the layouts diffusers hands over (q/k/v are [B, N, H, D] views, the padding
    bias is [B, 1, M] expanded over heads, tokens are one [S] list shared by the batch)."""
    import torch

    dt = getattr(torch, _TYPES[dtype].split(".")[1])
    B, H, N, M, D = 2, SD_HEADS.get(head_dim, 4), max(QUERY_BUCKETS), NUM_KEYS, head_dim
    meta = dict(device="meta", dtype=dt)
    q = torch.empty(B, N, H, D, **meta).transpose(1, 2)
    k = torch.empty(B, M, H, D, **meta).transpose(1, 2)
    v = torch.empty(B, M, H, D, **meta).transpose(1, 2) if with_v else None
    bias = torch.empty(B, 1, M, device="meta").expand(B, H, M)
    select = torch.empty(NUM_SELECTED, device="meta", dtype=torch.int64).expand(B, NUM_SELECTED) \
        if with_sel else None
    out, lse, maps = importlib.import_module("semfid.kernels.xattn_fwd").allocate(q, k, v, select, mean)
    return q, k, v, bias, select, out, lse, maps


def _sum_job(arch: int, dtype: str):
    """The split-sum kernel writing a gradient of this dtype (diffusers-layout strides)."""
    import torch

    C = importlib.import_module("semfid.kernels._common")
    dt = getattr(torch, _TYPES[dtype].split(".")[1])
    part = torch.empty(4, 2, 8, NUM_KEYS, 40, device="meta")
    out = torch.empty(2, NUM_KEYS, 8, 40, device="meta", dtype=dt).transpose(1, 2)
    args = (part, out, 4, 8, NUM_KEYS, 40, *out.stride())
    return (f"sum sm_{arch} {dtype} split-sum BLOCK={C._SUM_BLOCK} warps=4 stages=1",
            C._sum_splits_kernel, args, dict(BLOCK=C._SUM_BLOCK), 4, 1, arch, 0)


def _jobs(arches: Sequence[int], head_dims: Sequence[int], dtypes: Sequence[str], quick: bool,
          joint_head_dims: Sequence[int] = JOINT_HEAD_DIMS):
    """Yield (label, kernel, args, constexprs, num_warps, num_stages, arch, head dim) per config."""
    import torch

    # importlib, not `from semfid.kernels import xattn_fwd`: the package re-exports launchers with
    # the same names as the modules.
    U = importlib.import_module("semfid.kernels._utils")
    C = importlib.import_module("semfid.kernels._common")
    xattn_fwd = importlib.import_module("semfid.kernels.xattn_fwd")
    xattn_bwd = importlib.import_module("semfid.kernels.xattn_bwd")

    def configs(fn, args, cx) -> List[Tuple[int, int, int]]:
        """(BLOCK_M, warps, stages) the forward autotuner may pick for this launch: the kernel's
        own prune function applied to the launch's arguments (one rule, shared with the autotuner)."""
        found: List[Tuple[int, int, int]] = []
        for bucket in QUERY_BUCKETS:
            named = dict(zip(fn.arg_names, args), **cx, N_BUCKET=bucket)
            for c in U.candidate_configs(named, False):
                key = (c.kwargs["BLOCK_M"], c.num_warps, c.num_stages)
                if key not in found:
                    found.append(key)
        return found

    def fixed_configs(fn, args, cx) -> List[Tuple[int, int, int]]:
        """The one config the xattn backward runs, per query bucket (``fixed_config``)."""
        found: List[Tuple[int, int, int]] = []
        for bucket in QUERY_BUCKETS:
            named = list(args)
            named[fn.arg_names.index("N_BUCKET")] = bucket
            c = xattn_bwd.fixed_config(named, cx)
            key = (c.kwargs["BLOCK_M"], c.num_warps, c.num_stages)
            if key not in found:
                found.append(key)
        return found

    fwd_modes = {"target": FWD_MODES["target"]} if quick else FWD_MODES
    bwd_modes = {"out+maps": BWD_MODES["out+maps"]} if quick else BWD_MODES
    for arch in arches:
        for dtype in dtypes:
            yield _sum_job(arch, dtype)
            for d in head_dims:
                for mode, f in fwd_modes.items():
                    q, k, v, bias, sel, out, lse, maps = _sd_tensors(
                        d, dtype, f["MEAN_HEADS"], f["HAS_V"], f["HAS_SEL"])
                    args, cx, _ = xattn_fwd.launch_args(q, k, v, bias, sel, d ** -0.5, f["MEAN_HEADS"],
                                                        out, lse, maps)
                    cx["DOT_UPCAST"], cx["SPLIT_DOT"] = False, True
                    for (bm, w, st) in configs(xattn_fwd._xattn_fwd_kernel, args, cx):
                        yield (f"fwd sm_{arch} {dtype} D={d:<3} {mode:<9} BLOCK_M={bm:<3} warps={w} "
                               f"stages={st}", xattn_fwd._xattn_fwd_kernel, args, dict(cx, BLOCK_M=bm),
                               w, st, arch, d)
                for mode, f in bwd_modes.items():
                    q, k, v, bias, sel, out, lse, maps = _sd_tensors(d, dtype, True, True, True)
                    dout = torch.empty_like(out) if f["HAS_DO"] else None
                    dmaps = torch.empty_like(maps) if f["HAS_G"] else None
                    splits, rows = C.backward_splits(q.shape[2], q.shape[0] * q.shape[1])
                    dq, dk_part, dv_part = xattn_bwd.allocate(q, k, v, f["HAS_DO"], splits)
                    args, cx = xattn_bwd.launch_args(q, k, v, bias, sel, d ** -0.5, True, out, lse,
                                                     dout, dmaps, dq, dk_part, dv_part, rows)
                    cx["DOT_UPCAST"], cx["SPLIT_DOT"] = False, True
                    for (bm, w, st) in fixed_configs(xattn_bwd._xattn_bwd_kernel, args, cx):
                        yield (f"bwd sm_{arch} {dtype} D={d:<3} {mode:<9} BLOCK_M={bm:<3} warps={w} "
                               f"stages={st}", xattn_bwd._xattn_bwd_kernel, args, dict(cx, BLOCK_M=bm),
                               w, st, arch, d)
                yield from subject_jobs(arch, dtype, d, quick)
            yield from joint_jobs(arch, dtype, joint_head_dims, quick)


def _tool(name: str) -> Optional[str]:
    """Path of a CUDA tool shipped with triton (``triton/backends/nvidia/bin``), else on PATH."""
    try:
        import triton.backends.nvidia as nv

        path = os.path.join(os.path.dirname(nv.__file__), "bin", name)
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    return shutil.which(name)


def _resources(kernel) -> Tuple[int, int, int]:
    """(registers/thread, stack bytes, shared bytes) of a compiled kernel, read from its cubin with
    ``cuobjdump -res-usage`` (``n_regs``/``n_spills`` only exist after loading on a GPU). The
    kernels have no local arrays, so a non-zero stack frame is register spilling."""
    tool = _tool("cuobjdump")
    if tool is None:
        raise RuntimeError("cuobjdump not found (looked in triton/backends/nvidia/bin and PATH)")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        res = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True)
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res.stdout)
    if res.returncode != 0 or usage is None:
        raise RuntimeError(f"cuobjdump -res-usage failed: {(res.stderr or res.stdout).strip()}")
    regs, stack, _, local = (int(x) for x in usage.groups())
    shared = int(getattr(kernel.metadata, "shared", 0))
    return regs, stack + local, shared


def global_load_widths(ptx: str) -> Dict[int, int]:
    """{bytes per thread: count} of the global loads in a kernel's PTX (``ld.global.v4.b32`` is
    16 bytes, ``ld.global.b16`` 2): how far its tile loads were vectorised."""
    widths: Dict[int, int] = {}
    for suffix in re.findall(r"\bld\.global((?:\.[\w:]+)+)", ptx):  # e.g. .L1::evict_last.v4.b32
        parts = suffix.split(".")[1:]
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        bits = re.fullmatch(r"[a-z]+(\d+)", parts[-1])
        if bits:
            size = vec * int(bits.group(1)) // 8
            widths[size] = widths.get(size, 0) + 1
    return widths


_JOBS: list = []


def _compile_one(index: int):
    """Compile job ``index`` of :data:`_JOBS`; returns (label, head dim, result or error string)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    label, fn, args, cx, warps, stages, arch, d = _JOBS[index]
    try:
        target = GPUTarget("cuda", arch, 32)
        signature, constexprs, attrs = _specialize(fn, args, cx, target)
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        kernel = triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
        return label, d, _resources(kernel) + (global_load_widths(kernel.asm["ptx"]),)
    except Exception as e:  # report every failure, keep going
        msg = str(e).strip().splitlines()
        return label, d, f"{type(e).__name__}: {msg[0] if msg else ''}"


def _dedupe_key(job) -> tuple:
    """What triton compiles for a job: kernel, signature, constexprs, attrs, arch and config."""
    from triton.backends.compiler import GPUTarget

    _, fn, args, cx, warps, stages, arch, _ = job
    signature, constexprs, attrs = _specialize(fn, args, cx, GPUTarget("cuda", arch, 32))
    return (fn.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())),
            tuple(sorted((k, str(v)) for k, v in attrs.items())), arch, warps, stages)


def _run(args: argparse.Namespace) -> int:
    import concurrent.futures as cf
    import multiprocessing

    import triton

    start = time.monotonic()
    only = re.compile(args.only) if args.only else None
    jobs = [j for j in _jobs(args.arch, args.head_dims, args.dtypes, args.quick, args.joint_head_dims)
            if only is None or only.search(j[0])]
    # One compile per distinct specialisation; its result is reported under every label that has it.
    first: Dict[tuple, int] = {}
    owner = []
    for n, job in enumerate(jobs):
        try:
            key = _dedupe_key(job)
        except Exception:  # e.g. an unknown arch: no dedupe, the compile reports the error
            key = ("unique", n)
        if key not in first:
            first[key] = len(_JOBS)
            _JOBS.append(job)
        owner.append(first[key])
    print(f"triton {triton.__version__}: {len(jobs)} semfid kernel configs, {len(_JOBS)} distinct "
          f"compiles (M={NUM_KEYS} keys, S={NUM_SELECTED} selected for xattn, S in "
          f"{list(SUBJECT_SELECTED)} for subject, query buckets "
          f"{list(QUERY_BUCKETS)}, {args.jobs} processes)", flush=True)
    failures, spilling = [], []
    ctx = multiprocessing.get_context("fork")
    try:
        with cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
            results, compiled = pool.map(_compile_one, range(len(_JOBS))), []

            def in_order():  # stream: each label as soon as the compile it shares is done
                for job, i in zip(jobs, owner):
                    while len(compiled) <= i:
                        compiled.append(next(results)[2])
                    yield job[0], job[7], compiled[i]

            _report(in_order(), failures, spilling)
    except cf.process.BrokenProcessPool as e:  # the compiler aborted a worker (e.g. unknown arch)
        failures.append("worker")
        print(f"FAIL a compiler process crashed: {e}", flush=True)
    fp32_spilling = [label for label in spilling if " fp32 " in label]
    half_spilling = [label for label in spilling if " fp32 " not in label]
    gated = [label for label in half_spilling if args.strict or any(f" {m} " in label for m in GATED_MODES)]
    reported = [label for label in half_spilling if label not in gated]
    print(f"{len(jobs)} configs: {len(jobs) - len(failures)} compiled, {len(failures)} failed, "
          f"{len(gated)} spill registers ({time.monotonic() - start:.0f} s)")
    if reported:
        # Known and open: the cross-attention kernels' one-hot map products raised register use
        # past 255 on some fp16/bf16 tiles; slower there, still correct. Listed, not fatal.
        print(f"warning: {len(reported)} fp16/bf16 configs outside {list(GATED_MODES)} spill registers "
              f"(reported; --strict makes them fatal): " + "; ".join(reported))
    if fp32_spilling:
        # fp32 inputs take exact-fp32 tl.dot (FMA units, operands in registers); SD trains and
        # samples in fp16/bf16, the dtypes this gate is about. fp32 spills are reported, not fatal.
        print(f"warning: {len(fp32_spilling)} fp32 configs spill registers (fp16/bf16 must not; "
              f"fp32 spills are reported only): " + "; ".join(fp32_spilling))
    return 1 if failures or gated else 0


def _report(results, failures: List[str], spilling: List[str]) -> None:
    """Print one line per config; collect failures and configs that spill."""
    for label, d, result in results:
        if isinstance(result, str):
            failures.append(label)
            print(f"FAIL {label}: {result}", flush=True)
            continue
        regs, spills, shared, loads = result
        widths = " ".join(f"{n}x{size}B" for size, n in sorted(loads.items(), reverse=True))
        flag = ""
        if spills:  # every checked config is one the autotuner can pick
            spilling.append(label)
            flag = "  <-- SPILLS" + (" (fp32: reported, not fatal)" if " fp32 " in label else "")
        print(f"ok   {label}: regs={regs:<3} spill_bytes={spills:<5} shared={shared:<6} "
              f"global_loads={widths}{flag}", flush=True)


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(prog="python -m semfid.kernels.compile_check", description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=ints, default=[80, 90], help="compute capabilities (default 80,90)")
    p.add_argument("--head-dims", type=ints, default=None, help="SD head dims (default 40,64,80,160,256)")
    p.add_argument("--joint-head-dims", type=ints, default=None,
                   help="head dims of the key-blocked (joint key set) kernels (default 64,72,128; none "
                        "when --head-dims is given)")
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=["fp16", "bf16", "fp32"])
    p.add_argument("--quick", action="store_true", help="fp16-relevant modes only (target / out+maps)")
    p.add_argument("-j", "--jobs", type=int, default=min(8, os.cpu_count() or 1),
                   help="parallel compile processes (default: cores, at most 8)")
    p.add_argument("--only", default="", help="only the configs whose label matches this regex")
    p.add_argument("--strict", action="store_true",
                   help="fail on any fp16/bf16 spill, not only in the gated subject modes")
    p.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.joint_head_dims is None:
        args.joint_head_dims = list(JOINT_HEAD_DIMS) if args.head_dims is None else []
    if args.head_dims is None:
        args.head_dims = list(SD_HEAD_DIMS)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m semfid.info --compile-check``; returns the exit status."""
    args = _parse(argv)
    if args.in_process:
        return _run(args)
    try:
        import triton  # noqa: F401
    except ImportError as e:
        print(f"compile check needs triton: {e}", file=sys.stderr)
        return 1
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the interpreter would bypass the compiler
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated to silence its warning
    cmd = [sys.executable, "-m", "semfid.kernels.compile_check", "--in-process",
           "--arch", ",".join(map(str, args.arch)), "--head-dims", ",".join(map(str, args.head_dims)),
           "--joint-head-dims", ",".join(map(str, args.joint_head_dims)),
           "--dtypes", ",".join(args.dtypes), "--jobs", str(args.jobs), "--only", args.only] + (["--quick"] if args.quick else []) \
        + (["--strict"] if args.strict else [])
    start = time.monotonic()
    status = subprocess.call(cmd, env=env)
    print(f"compile check: exit status {status}, {time.monotonic() - start:.0f} s wall "
          f"(imports and compiles)", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
