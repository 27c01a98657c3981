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
    select_block,
)



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
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
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

        # Softmax of the full row. A row whose keys are all -inf has max -inf: shift by 0 so that
        # every exp2 is 0 (not NaN), then P = 0 and lse = +inf. A NaN logit keeps the row NaN.
        m_i = tl.max(s, axis=1)
        m_i = tl.where(m_i == float("-inf"), 0.0, m_i)
        p = tl.math.exp2((s - m_i[:, None]) * 1.4426950408889634)  # exp(s - max), via log2(e)
        l_i = tl.sum(p, axis=1)
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # all-masked row: p is 0 already; NaN stays NaN
        lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.math.log2(l_safe) * 0.6931471805599453)
        p = p / l_safe[:, None]
        tl.store(LSE + off_b * stride_lseb + off_h * stride_lseh + offs_m * stride_lsem, lse, mask=m_mask)

        if HAS_SEL:
            # Gather column SEL[j] of P exactly (a masked row sum, no dot): duplicates allowed.
            maps_h = tl.zeros([BLOCK_M, BLOCK_S], dtype=tl.float32)
            for j in range(NUM_SEL):
                col = tl.load(SEL + off_b * stride_selb + j * stride_sels)
                p_col = tl.sum(tl.where(offs_n[None, :] == col, p, 0.0), axis=1)
                maps_h = tl.where(offs_s[None, :] == j, p_col[:, None], maps_h)
            if MEAN_HEADS:
                maps_sum += maps_h
            else:
                tl.store(MAPS + off_b * stride_ab + off_h * stride_ah
                         + offs_m[:, None] * stride_am + offs_s[None, :] * stride_as,
                         maps_h, mask=m_mask[:, None] & (offs_s[None, :] < NUM_SEL))

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
                     maps_sum / H, mask=m_mask[:, None] & (offs_s[None, :] < NUM_SEL))


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
        DOT_PRECISION=dot_precision(q.dtype), DOT_UPCAST=dot_upcast(q.dtype),
    )
    programs_per_row_block = B if mean else B * H

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]), programs_per_row_block)

    return args, constexprs, grid


def xattn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    select: Optional[torch.Tensor],
    scale: float,
    mean_heads: bool,
    out: torch.Tensor,
    lse: torch.Tensor,
    maps: torch.Tensor,
) -> None:
    """Launch the forward kernel, writing into preallocated ``out``, ``lse`` and ``maps``.

    Shapes follow ``semfid.backends.base``: q [B, H, N, D], k [B, H, M, D], v [B, H, M, Dv] or None,
    bias [B, H, M] fp32 or None, select [B, S] int64 or None; out [B, H, N, Dv] (empty when v is
    None), lse [B, H, N] fp32, maps [B, H, N, S] / [B, N, S] fp32 (empty when select is None).
    Any strides are accepted (no copies); ``mean_heads`` without ``select`` is treated as per-head.
    """
    B, H, N, _ = q.shape
    if N == 0 or B == 0 or H == 0:
        return
    args, constexprs, grid = launch_args(q, k, v, bias, select, scale, mean_heads, out, lse, maps)
    if interpreting():
        _xattn_fwd_kernel[grid](*args, **constexprs, **INTERPRETER_CONFIG)
    else:
        _xattn_fwd_kernel_tuned[grid](*args, **constexprs)
