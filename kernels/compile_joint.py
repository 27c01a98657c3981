"""The key-blocked kernels' launches for the compile check (``semfid.kernels.compile_check``).

Each job is exactly what a launcher runs: the launchers' own ``launch`` / ``launches`` functions
build the arguments and constexprs from meta tensors in a Flux.1 layer's layout at 1024 px
(B = 1, keys [512 text, 4096 image], maps over the 4096 image queries, the reference replacing
the text segment with 512 reference keys; diffusers' transposed views, the padding bias expanded
over the heads). Head dims 64 (SD3), 72 (PixArt-Σ), 128 (Flux); tiles are fixed per shape class
(no autotuning), so one config per (mode, S): every mode at S = 4, per-head cross-attention maps at
S = 77 (the subject op takes at most 32 tokens there); fp32 (not gated) at one head dim.
Imports only torch and triton.
"""

from __future__ import annotations

import importlib
from typing import Iterator, Sequence

#: Head dims of the DiTs the key-blocked kernels serve (SD3, PixArt-Σ, Flux).
JOINT_HEAD_DIMS = (64, 72, 128)
JOINT_HEADS = {64: 24, 72: 16, 128: 24}
TEXT, IMAGE, REF_TEXT = 512, 4096, 512
#: Selected tokens: a few subject words (4), and every CLIP token (77: BLOCK_S 128, 32-row tiles).
JOINT_SELECTED = (4, 77)
#: semfid.backends.triton.JOINT_SUBJECT_MAX_TOKENS (not imported: this module imports only torch/triton).
JOINT_SUBJECT_MAX_TOKENS = 32
#: (op, direction) modes; all are gated (0 fp16/bf16 spills): the DiT training path.
JOINT_MODES = ("joint_xattn", "joint_maps", "joint_subj", "joint_subj_ref")

_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def _tensors(head_dim: int, dtype: str, S: int):
    import torch

    dt = getattr(torch, _DTYPES[dtype])
    B, H, D = 1, JOINT_HEADS.get(head_dim, 24), head_dim
    N = M = TEXT + IMAGE
    meta = dict(device="meta", dtype=dt)
    q, k, v, k_ref = (torch.empty(B, n, H, D, **meta).transpose(1, 2) for n in (N, M, M, REF_TEXT))
    bias = torch.empty(B, 1, M, device="meta").expand(B, H, M)
    ref_bias = torch.empty(B, 1, REF_TEXT, device="meta").expand(B, H, REF_TEXT)
    tokens = torch.empty(S, device="meta", dtype=torch.int64).expand(B, S)
    return q, k, v, k_ref, bias, ref_bias, tokens


def _label(direction, arch, dtype, d, mode, S, kernel, bm, bn, w):
    name = kernel.__name__.replace("_joint_", "").replace("_kernel", "")
    return (f"{direction} sm_{arch} {dtype} D={d:<3} {mode:<14} S={S:<2} {name:<8} BLOCK_M={bm:<3} "
            f"BLOCK_N={bn:<3} warps={w} stages=1")


def joint_jobs(arch: int, dtype: str, head_dims: Sequence[int], quick: bool) -> Iterator[tuple]:
    """(label, kernel, args, constexprs, num_warps, num_stages, arch, head dim) per launch of the
    key-blocked kernels (``quick``: the subject modes at S = 4 only)."""
    import torch

    fwd = importlib.import_module("semfid.kernels.joint_fwd")
    bwd = importlib.import_module("semfid.kernels.joint_bwd")
    rows, seg = (TEXT, TEXT + IMAGE), (0, TEXT)
    if dtype == "fp32":  # reported only (not gated): one head dim shows it compiles
        head_dims = [d for d in head_dims if d == 72][:1] or list(head_dims)[:1]
    for d in head_dims:
        for S in JOINT_SELECTED[:1] if quick else JOINT_SELECTED:
            q, k, v, k_ref, bias, ref_bias, tok = _tensors(d, dtype, S)
            B, H, N, _ = q.shape
            modes = ("joint_subj", "joint_subj_ref") if quick else JOINT_MODES
            if S > JOINT_SUBJECT_MAX_TOKENS:
                # The widest column tiles: cross-attention only. The Triton backend refuses the
                # subject op with more than 32 tokens on these kernels (semfid.backends.triton): its
                # backward spilled 8-24 B at S = 77 (sm_90, head dims 64 / 72), so it is not run.
                modes = ("joint_xattn",)
            for mode in modes:
                subject = mode.startswith("joint_subj")
                detach = mode != "joint_subj_ref"
                mean = mode != "joint_subj_ref"  # per-head maps with the reference's gradient
                val = None if mode == "joint_maps" else v
                out, lse = fwd.allocate(q, val)
                a_t = torch.empty(B, H, rows[1] - rows[0], S, device="meta")
                lse_ref = torch.empty_like(lse) if not (mean and detach) else lse.new_empty(0)
                ref = dict(k_ref=k_ref, ref_bias=ref_bias, ref_tokens=tok, segment=seg) if subject else {}
                args, cx, _, warps = fwd.launch(q, k, val, bias, tok, d ** -0.5, rows, out, lse, a_t,
                                                lse_ref=lse_ref if subject else None,
                                                a_r=a_t if subject else None, **ref)
                cx["DOT_UPCAST"], cx["SPLIT_DOT"] = False, True
                yield (_label("fwd", arch, dtype, d, mode, S, fwd._joint_fwd_kernel, cx["BLOCK_M"],
                              cx["BLOCK_N"], warps), fwd._joint_fwd_kernel, args, cx, warps, 1, arch, d)
                dout = torch.empty_like(out) if val is not None else None
                dmaps_shape = (B, rows[1] - rows[0], S) if mean else (B, H, rows[1] - rows[0], S)
                dmaps = None if (subject and detach) else torch.empty(dmaps_shape, device="meta")
                extra = {}
                if subject:
                    diff = torch.empty(B, rows[1] - rows[0], S, device="meta") if mean else lse.new_empty(0)
                    extra = dict(ref, lse_ref=lse_ref, diff=diff, dloss=torch.empty(B, device="meta"),
                                 mean_heads=mean, detach_reference=detach,
                                 dk_ref=None if detach else torch.empty_like(k_ref))
                else:
                    extra = dict(mean_heads=True)
                dq, dk = torch.empty_like(q), torch.empty_like(k)
                dv = torch.empty_like(v) if val is not None else q.new_empty(0)
                for kernel, _, args, cx, warps in bwd.launches(q, k, val, bias, tok, d ** -0.5, rows, lse, out,
                                                               dout, dmaps, dq, dk, dv, **extra):
                    cx = dict(cx)
                    cx["DOT_UPCAST"] = False
                    if "SPLIT_DOT" in cx:
                        cx["SPLIT_DOT"] = True
                    yield (_label("bwd", arch, dtype, d, mode, S, kernel, cx["BLOCK_M"], cx.get("BLOCK_N", 0),
                                  warps), kernel, args, cx, warps, 1, arch, d)
