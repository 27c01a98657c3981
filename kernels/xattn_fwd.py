"""Forward kernel: cross-attention output, lse and the selected probability columns in one pass.

All keys of a head (M <= 256) fit one block, so each program computes its rows' full softmax at once
(no online rescaling), writes ``out`` and ``lse``, and writes only the S selected columns of P, per
head or averaged over heads. No [B, H, N, M] tensor ever reaches global memory.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._utils import (
    INTERPRETER_CONFIG,
    autotune_configs,
    dot_precision,
    dot_upcast,
    head_dim_block,
    interpreting,
    key_block,
    max_head_dim_block,
    mma,
    prune_fwd_configs,
    query_bucket,
)
from ._common import aligned8, aligned_strides, device_guard, exact_dot, one_hot, row_softmax, select_block



@triton.jit
def _xattn_fwd_kernel(
    Q, K, V, BIAS, SEL, O, LSE, MAPS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_biasb, stride_biash, stride_biasn,
    stride_selb, stride_sels,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lseb, stride_lseh, stride_lsem,
    stride_ab, stride_ah, stride_am, stride_as,
    H, N_Q, N_KV, NUM_SEL, N_BUCKET,
    sm_scale,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_V: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEL: tl.constexpr, MEAN_HEADS: tl.constexpr,
    ALIGNED: tl.constexpr, SPLIT_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """One block of query rows: full-row softmax over all keys, output, lse and selected maps.

    Formula, per head h and row m::

        s[n]   = q[m]·k[n] · sm_scale + bias[n]                  (n < N_KV; padded keys: -inf)
        P[n]   = exp2((s[n] - max s) · log2 e) / Σ_n (same)      (0 for a row whose keys are all -inf)
        O[m]   = Σ_n P[n] v[n]                                   (HAS_V)
        LSE[m] = max s + ln Σ_n exp(s[n] - max s)                (natural log; +inf for an all -inf row)
        MAPS[m, j] = P[SEL[j]]  or  (1/H) Σ_h P_h[SEL[j]]        (HAS_SEL; MEAN_HEADS)

    Logits stay in natural units until after the max is subtracted (only then scaled by log2 e for
    exp2): with a -10000 padding bias, s is ~-10^4 and any extra rounding there costs ~1e-3.

    Grid: ``(cdiv(N_Q, BLOCK_M), B * H)``, or ``(cdiv(N_Q, BLOCK_M), B)`` with MEAN_HEADS, where one
    program loops over the H heads of its batch item and sums its map tile in registers (no atomics,
    so the head mean is deterministic).

    Invariants: BLOCK_N >= N_KV (all keys of a head in one block); the head dims are walked in
    chunks of BLOCK_D / BLOCK_DV (powers of two >= 16) with ``offs_d < HEAD_DIM`` masks, so a
    head dim of 160 costs 5 x 32, not 256. Products accumulate in fp32; O is cast to its own
    element type. Rows >= N_Q and keys >= N_KV are masked on every load and store. Batch and
    head offsets are int64.
    """
    tl.static_assert(BLOCK_N >= 16)
    tl.static_assert(BLOCK_D >= 16)
    tl.static_assert(BLOCK_S >= 16)
    stride_qb, stride_qh, stride_qm = aligned_strides(stride_qb, stride_qh, stride_qm, ALIGNED)
    stride_kb, stride_kh, stride_kn = aligned_strides(stride_kb, stride_kh, stride_kn, ALIGNED)
    stride_vb, stride_vh, stride_vn = aligned_strides(stride_vb, stride_vh, stride_vn, ALIGNED)
    stride_ob, stride_oh, stride_om = aligned_strides(stride_ob, stride_oh, stride_om, ALIGNED)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    if MEAN_HEADS:
        off_b = pid_bh
        h_start = 0
        h_end = H
    else:
        off_b = pid_bh // H
        h_start = pid_bh % H
        h_end = h_start + 1
    off_b = tl.cast(off_b, tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_s = tl.arange(0, BLOCK_S)
    m_mask = offs_m < N_Q
    n_mask = offs_n < N_KV
    s_mask = offs_s < NUM_SEL
    if HAS_SEL:  # the selected key indices of this batch row, as a vector (no scalar loads)
        sel = tl.load(SEL + off_b * stride_selb + offs_s * stride_sels, mask=s_mask, other=0)

    maps_sum = tl.zeros([BLOCK_M, BLOCK_S], dtype=tl.float32)
    for h in range(h_start, h_end):
        off_h = tl.cast(h, tl.int64)
        q_ptr = Q + off_b * stride_qb + off_h * stride_qh
        k_ptr = K + off_b * stride_kb + off_h * stride_kh

        # Logits of the whole row: all keys at once, head dim in chunks.
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, HEAD_DIM, BLOCK_D):
            d = d0 + offs_d
            d_mask = d < HEAD_DIM
            q = tl.load(q_ptr + offs_m[:, None] * stride_qm + d[None, :] * stride_qd,
                        mask=m_mask[:, None] & d_mask[None, :], other=0.0)
            k = tl.load(k_ptr + offs_n[:, None] * stride_kn + d[None, :] * stride_kd,
                        mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            s = mma(q, tl.trans(k), s, DOT_PRECISION, DOT_UPCAST)
        s = s * sm_scale
        if HAS_BIAS:
            bias = tl.load(BIAS + off_b * stride_biasb + off_h * stride_biash + offs_n * stride_biasn,
                           mask=n_mask, other=0.0)
            s = s + bias.to(tl.float32)[None, :]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        p, lse = row_softmax(s)
        tl.store(LSE + off_b * stride_lseb + off_h * stride_lseh + offs_m * stride_lsem, lse, mask=m_mask)

        if HAS_SEL:
            # P[:, SEL] as one product with the one-hot matrix of SEL (duplicates allowed).
            maps_h = exact_dot(p, one_hot(sel, s_mask, offs_n, True), SPLIT_DOT)
            if MEAN_HEADS:
                maps_sum += maps_h
            else:
                tl.store(MAPS + off_b * stride_ab + off_h * stride_ah
                         + offs_m[:, None] * stride_am + offs_s[None, :] * stride_as,
                         maps_h, mask=m_mask[:, None] & s_mask[None, :])

        if HAS_V:
            # The maps above were P's last fp32 use: only its tensor-core operand (input dtype,
            # half the registers) stays live through the value-dim loop. Under the interpreter's
            # bf16 upcast P stays fp32, as in ``mma``.
            if not DOT_UPCAST:
                p = p.to(V.dtype.element_ty)
            v_ptr = V + off_b * stride_vb + off_h * stride_vh
            o_ptr = O + off_b * stride_ob + off_h * stride_oh
            for d0 in range(0, VALUE_DIM, BLOCK_DV):
                d = d0 + tl.arange(0, BLOCK_DV)
                d_mask = d < VALUE_DIM
                v = tl.load(v_ptr + offs_n[:, None] * stride_vn + d[None, :] * stride_vd,
                            mask=n_mask[:, None] & d_mask[None, :], other=0.0)
                o = mma(p, v, None, DOT_PRECISION, DOT_UPCAST)
                tl.store(o_ptr + offs_m[:, None] * stride_om + d[None, :] * stride_od,
                         o.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])

    if HAS_SEL:
        if MEAN_HEADS:
            tl.store(MAPS + off_b * stride_ab + offs_m[:, None] * stride_am + offs_s[None, :] * stride_as,
                     maps_sum / H, mask=m_mask[:, None] & s_mask[None, :])


_xattn_fwd_kernel_tuned = triton.autotune(
    configs=autotune_configs(),
    key=["N_BUCKET", "N_KV", "HEAD_DIM", "VALUE_DIM", "NUM_SEL", "HAS_V", "HAS_SEL", "MEAN_HEADS"],
    prune_configs_by={"early_config_prune": prune_fwd_configs},
)(_xattn_fwd_kernel)


def _strides(t: Optional[torch.Tensor], n: int) -> Tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


def launch_args(q, k, v, bias, select, scale, mean_heads, out, lse, maps):
    """(positional args, constexpr kwargs, grid) of one forward launch; also used by the compile
    check (with meta tensors) so that it compiles exactly what a launch would."""
    B, H, N, D = q.shape
    M = k.shape[2]
    Dv = v.shape[3] if v is not None else 0
    S = select.shape[1] if select is not None else 0
    mean = bool(mean_heads and select is not None)
    if select is None:
        maps_strides = (0, 0, 0, 0)
    elif mean:  # [B, N, S]: the head stride is 0
        maps_strides = (maps.stride(0), 0, maps.stride(1), maps.stride(2))
    else:
        maps_strides = tuple(maps.stride())
    # Absent tensors are replaced by a present one of any type: their flag keeps them unread.
    args = (
        q, k, v if v is not None else q, bias if bias is not None else lse,
        select if select is not None else lse, out if v is not None else q, lse,
        maps if select is not None else lse,
        *q.stride(), *k.stride(), *_strides(v, 4), *_strides(bias, 3), *_strides(select, 2),
        *(_strides(out, 4) if v is not None else (0,) * 4), *lse.stride(), *maps_strides,
        H, N, M, S, query_bucket(N),
        float(scale),
    )
    max_block_d = max_head_dim_block(q.dtype, backward=False)
    constexprs = dict(
        HEAD_DIM=D, VALUE_DIM=max(Dv, 1), BLOCK_N=key_block(M), BLOCK_D=head_dim_block(D, max_block_d),
        BLOCK_DV=head_dim_block(Dv, max_block_d) if Dv else 16, BLOCK_S=select_block(S),
        HAS_V=v is not None, HAS_BIAS=bias is not None, HAS_SEL=select is not None, MEAN_HEADS=mean,
        ALIGNED=aligned8(q, k, v, out if v is not None else None), SPLIT_DOT=not interpreting(),
        DOT_PRECISION=dot_precision(q.dtype), DOT_UPCAST=dot_upcast(q.dtype),
    )
    programs_per_row_block = B if mean else B * H

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]), programs_per_row_block)

    return args, constexprs, grid


def allocate(q, k, v, select, mean_heads):
    """(out, lse, maps) in the layouts of CONTRACT.md: out [B, H, N, Dv] over [B, N, H, Dv] memory
    (empty when v is None), lse [B, H, N] fp32, maps [B, N, S] / [B, H, N, S] fp32 (or empty)."""
    B, H, N, _ = q.shape
    f32 = dict(dtype=torch.float32, device=q.device)
    out = (torch.empty(B, N, H, v.shape[3], dtype=q.dtype, device=q.device).transpose(1, 2)
           if v is not None else q.new_empty(0))
    if select is None:
        maps = torch.empty(0, **f32)
    else:
        S = select.shape[1]
        maps = torch.empty((B, N, S) if mean_heads else (B, H, N, S), **f32)
    return out, torch.empty(B, H, N, **f32), maps


def xattn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    select: Optional[torch.Tensor],
    scale: float,
    mean_heads: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, maps) of one fused pass (layouts: :func:`allocate`), one launch.

    q [B, H, N, D], k [B, H, M, D], v [B, H, M, Dv] or None, bias [B, H, M] fp32 or None, select
    [B, S] int64 or None; any strides (no copies). ``mean_heads`` without ``select`` is per-head.
    """
    B, H, N, _ = q.shape
    out, lse, maps = allocate(q, k, v, select, mean_heads)
    if N == 0 or B == 0 or H == 0:
        return out, lse, maps
    args, constexprs, grid = launch_args(q, k, v, bias, select, scale, mean_heads, out, lse, maps)
    with device_guard(q):
        if interpreting():
            _xattn_fwd_kernel[grid](*args, **constexprs, **INTERPRETER_CONFIG)
        else:
            _xattn_fwd_kernel_tuned[grid](*args, **constexprs)
    return out, lse, maps
