"""Backward kernel: recompute P from the saved lse, fold the map gradient into dP, write dq and
deterministic dk/dv partials (summed afterwards in a fixed order).
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
    prune_bwd_configs,
    query_bucket,
)
from ._common import aligned8, aligned_strides, backward_splits, device_guard, exact_dot, one_hot, select_block, sum_splits_into

@triton.jit
def _xattn_bwd_kernel(
    Q, K, V, BIAS, SEL, O, LSE, DO, G, DQ, DK_PART, DV_PART,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_biasb, stride_biash, stride_biasn,
    stride_selb, stride_sels,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lseb, stride_lseh, stride_lsem,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_gb, stride_gh, stride_gm, stride_gs,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, N_Q, N_KV, NUM_SEL, N_BUCKET, ROWS_PER_SPLIT,
    sm_scale, g_scale,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_DO: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_G: tl.constexpr,
    ALIGNED: tl.constexpr, SPLIT_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """Gradients of one head over one range of query rows.

    Formula (P recomputed, never loaded; G = map gradient, pre-divided by H for head-mean maps)::

        P     = exp2((q·kᵀ · scale + bias − lse) · log2 e) / rowsum(same)   (lse = +inf gives P = 0;
                the row sum, ~1, removes the rounding of an fp32 lse of magnitude 1e4)
        dP    = dO · Vᵀ + scatter(G)            scatter(G)[m, n] = Σ_{j: SEL[j] = n} G[m, j]
        delta = rowsum(dO ⊙ O) + rowsum(P ⊙ scatter(G))                  (= rowsum(P ⊙ dP))
        dS    = P ⊙ (dP − delta)
        dQ    = dS · K · scale,   dK_part += dSᵀ · Q · scale,   dV_part += Pᵀ · dO

    Grid: ``(splits, B * H)``. Program (i, bh) owns rows [i·ROWS_PER_SPLIT, (i+1)·ROWS_PER_SPLIT)
    of head bh: it writes their dQ and walks them in BLOCK_M tiles, accumulating its own dK/dV
    partial ``DK_PART[i, bh]`` / ``DV_PART[i, bh]`` (fp32 [N_KV, HEAD_DIM] / [N_KV, VALUE_DIM],
    contiguous). The first tile stores, later tiles load-add-store: no other program touches the
    partial, so the caller's sum over i is bitwise reproducible.

    Invariants: as the forward (all keys in one block, head dims in masked BLOCK_D chunks, fp32
    accumulation, int64 batch/head offsets). dS and P are rounded to the input dtype only as
    ``tl.dot`` operands, as in flash-attention.
    """
    tl.static_assert(BLOCK_N >= 16)
    tl.static_assert(BLOCK_D >= 16)
    tl.static_assert(BLOCK_S >= 16)
    stride_qb, stride_qh, stride_qm = aligned_strides(stride_qb, stride_qh, stride_qm, ALIGNED)
    stride_kb, stride_kh, stride_kn = aligned_strides(stride_kb, stride_kh, stride_kn, ALIGNED)
    stride_vb, stride_vh, stride_vn = aligned_strides(stride_vb, stride_vh, stride_vn, ALIGNED)
    stride_ob, stride_oh, stride_om = aligned_strides(stride_ob, stride_oh, stride_om, ALIGNED)
    stride_dob, stride_doh, stride_dom = aligned_strides(stride_dob, stride_doh, stride_dom, ALIGNED)
    stride_dqb, stride_dqh, stride_dqm = aligned_strides(stride_dqb, stride_dqh, stride_dqm, ALIGNED)
    pid_split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = tl.cast(pid_bh // H, tl.int64)
    off_h = tl.cast(pid_bh % H, tl.int64)
    part = tl.cast(pid_split, tl.int64) * tl.num_programs(1) + pid_bh

    q_ptr = Q + off_b * stride_qb + off_h * stride_qh
    k_ptr = K + off_b * stride_kb + off_h * stride_kh
    v_ptr = V + off_b * stride_vb + off_h * stride_vh
    o_ptr = O + off_b * stride_ob + off_h * stride_oh
    do_ptr = DO + off_b * stride_dob + off_h * stride_doh
    g_ptr = G + off_b * stride_gb + off_h * stride_gh
    dq_ptr = DQ + off_b * stride_dqb + off_h * stride_dqh
    dk_ptr = DK_PART + part * N_KV * HEAD_DIM
    dv_ptr = DV_PART + part * N_KV * VALUE_DIM

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_mask = offs_n < N_KV
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < NUM_SEL
    if HAS_G:  # selected key indices as a vector and their one-hot matrix [BLOCK_N, BLOCK_S]
        sel = tl.load(SEL + off_b * stride_selb + offs_s * stride_sels, mask=s_mask, other=0)
        e_sel = one_hot(sel, s_mask, offs_n, True)
    if HAS_BIAS:
        bias = tl.load(BIAS + off_b * stride_biasb + off_h * stride_biash + offs_n * stride_biasn,
                       mask=n_mask, other=0.0).to(tl.float32)

    row_start = pid_split * ROWS_PER_SPLIT
    row_end = tl.minimum(row_start + ROWS_PER_SPLIT, N_Q)
    for start_m in range(row_start, row_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < row_end
        # The first tile initialises the partials, later ones add to them. (A [BLOCK_N] vector
        # rather than a scalar: the interpreter mis-types `tensor_mask & scalar_bool`.)
        accumulate = (tl.zeros([BLOCK_N], dtype=tl.int32) + start_m) > row_start

        # Recompute P from q, k and lse. Rows past the end load lse = +inf, so their P is 0.
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
            s = s + bias[None, :]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        lse = tl.load(LSE + off_b * stride_lseb + off_h * stride_lseh + offs_m * stride_lsem,
                      mask=m_mask, other=float("inf"))
        p = tl.math.exp2((s - lse[:, None]) * 1.4426950408889634)
        # Renormalise over the row (all keys are in the block): an fp32 lse of magnitude ~1e4 (a
        # -10000 padding bias) is only good to ~5e-4, which would scale every P of the row.
        l_i = tl.sum(p, axis=1)
        p = p / tl.where(l_i == 0.0, 1.0, l_i)[:, None]

        # dS = P ⊙ (dP − delta) with dP = dO·Vᵀ + scatter(G), built as
        #     dS = P ⊙ (dO·Vᵀ − delta) + P ⊙ scatter(G)
        # so that at most two [BLOCK_M, BLOCK_N] fp32 tiles are live at any point (P and dO·Vᵀ,
        # then P and dS) and the maps-only pass (no dO) never materialises a dP tile at all: there
        # dS starts as −P·delta and only the S selected columns are added.
        delta = tl.zeros([BLOCK_M], dtype=tl.float32)
        if HAS_G:
            # delta += Σ_j G[:, j] · P[:, SEL[j]]  (= rowsum(P ⊙ scatter(G)); duplicates add up)
            g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_s[None, :] * stride_gs,
                        mask=m_mask[:, None] & s_mask[None, :], other=0.0).to(tl.float32) * g_scale
            delta += tl.sum(g * exact_dot(p, e_sel, SPLIT_DOT), axis=1)
        if HAS_DO:
            # dO·Vᵀ and delta += rowsum(dO ⊙ O)
            dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for d0 in range(0, VALUE_DIM, BLOCK_DV):
                d = d0 + offs_dv
                d_mask = d < VALUE_DIM
                tile_mask = m_mask[:, None] & d_mask[None, :]
                do = tl.load(do_ptr + offs_m[:, None] * stride_dom + d[None, :] * stride_dod,
                             mask=tile_mask, other=0.0)
                o = tl.load(o_ptr + offs_m[:, None] * stride_om + d[None, :] * stride_od,
                            mask=tile_mask, other=0.0)
                v = tl.load(v_ptr + offs_n[:, None] * stride_vn + d[None, :] * stride_vd,
                            mask=n_mask[:, None] & d_mask[None, :], other=0.0)
                dp = mma(do, tl.trans(v), dp, DOT_PRECISION, DOT_UPCAST)
                delta += tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
            ds = p * (dp - delta[:, None])
        else:
            ds = p * (-delta[:, None])
        if HAS_G:
            # dS += P ⊙ scatter(G): column j of G lands on key SEL[j] (one product with Eᵀ).
            ds += p * exact_dot(g, tl.trans(e_sel), SPLIT_DOT)

        # dQ = dS · K · scale (complete for these rows: all keys are in the block).
        for d0 in range(0, HEAD_DIM, BLOCK_D):
            d = d0 + offs_d
            d_mask = d < HEAD_DIM
            k = tl.load(k_ptr + offs_n[:, None] * stride_kn + d[None, :] * stride_kd,
                        mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            dq = mma(ds, k, None, DOT_PRECISION, DOT_UPCAST) * sm_scale
            tl.store(dq_ptr + offs_m[:, None] * stride_dqm + d[None, :] * stride_dqd,
                     dq.to(DQ.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])

        # dK partial += dSᵀ · Q · scale.
        for d0 in range(0, HEAD_DIM, BLOCK_D):
            d = d0 + offs_d
            d_mask = d < HEAD_DIM
            q = tl.load(q_ptr + offs_m[:, None] * stride_qm + d[None, :] * stride_qd,
                        mask=m_mask[:, None] & d_mask[None, :], other=0.0)
            dk = mma(tl.trans(ds), q, None, DOT_PRECISION, DOT_UPCAST) * sm_scale
            part_ptr = dk_ptr + offs_n[:, None] * HEAD_DIM + d[None, :]
            part_mask = n_mask[:, None] & d_mask[None, :]
            dk += tl.load(part_ptr, mask=part_mask & accumulate[:, None], other=0.0)
            tl.store(part_ptr, dk, mask=part_mask)

        # dV partial += Pᵀ · dO.
        if HAS_DO:
            for d0 in range(0, VALUE_DIM, BLOCK_DV):
                d = d0 + offs_dv
                d_mask = d < VALUE_DIM
                do = tl.load(do_ptr + offs_m[:, None] * stride_dom + d[None, :] * stride_dod,
                             mask=m_mask[:, None] & d_mask[None, :], other=0.0)
                dv = mma(tl.trans(p), do, None, DOT_PRECISION, DOT_UPCAST)
                part_ptr = dv_ptr + offs_n[:, None] * VALUE_DIM + d[None, :]
                part_mask = n_mask[:, None] & d_mask[None, :]
                dv += tl.load(part_ptr, mask=part_mask & accumulate[:, None], other=0.0)
                tl.store(part_ptr, dv, mask=part_mask)
        # The next tile reloads these partials, possibly in other threads: order the stores first.
        tl.debug_barrier()


def _strides(t: Optional[torch.Tensor], n: int) -> Tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


def launch_args(q, k, v, bias, select, scale, mean_heads, out, lse, dout, dmaps,
                dq, dk_part, dv_part, rows_per_split):
    """(positional args, constexpr kwargs) of one backward launch (grid: ``(splits, B * H)``);
    also used by the compile check, with meta tensors."""
    B, H, N, D = q.shape
    M = k.shape[2]
    Dv = v.shape[3] if v is not None else 0
    has_do = v is not None and dout is not None
    has_g = select is not None and dmaps is not None
    if not has_g:
        g_strides, g_scale = (0, 0, 0, 0), 1.0
    elif mean_heads:  # G [B, N, S] is shared by the heads, each gets G / H
        g_strides, g_scale = (dmaps.stride(0), 0, dmaps.stride(1), dmaps.stride(2)), 1.0 / H
    else:
        g_strides, g_scale = tuple(dmaps.stride()), 1.0
    # Absent tensors are replaced by a present one of any type: their flag keeps them unread.
    args = (
        q, k, v if has_do else q, bias if bias is not None else lse,
        select if has_g else lse, out if has_do else q, lse, dout if has_do else q,
        dmaps if has_g else lse, dq, dk_part, dv_part,
        *q.stride(), *k.stride(), *(v.stride() if has_do else (0,) * 4), *_strides(bias, 3),
        *(select.stride() if has_g else (0, 0)), *(out.stride() if has_do else (0,) * 4),
        *lse.stride(), *(dout.stride() if has_do else (0,) * 4), *g_strides, *dq.stride(),
        H, N, M, select.shape[1] if has_g else 0, query_bucket(N), rows_per_split,
        float(scale), g_scale,
    )
    max_block_d = max_head_dim_block(q.dtype, backward=True)
    constexprs = dict(
        HEAD_DIM=D, VALUE_DIM=max(Dv, 1) if has_do else 1, BLOCK_N=key_block(M),
        BLOCK_D=head_dim_block(D, max_block_d),
        BLOCK_DV=head_dim_block(Dv, max_block_d) if has_do else 16,
        BLOCK_S=select_block(select.shape[1] if has_g else 1),
        HAS_DO=has_do, HAS_BIAS=bias is not None, HAS_G=has_g,
        ALIGNED=aligned8(q, k, v if has_do else None, out if has_do else None, dout, dq),
        SPLIT_DOT=not interpreting(),
        DOT_PRECISION=dot_precision(q.dtype), DOT_UPCAST=dot_upcast(q.dtype),
    )
    return args, constexprs


def allocate(q, k, v, has_do, splits):
    """dq (empty_like q) and the fp32 partials [splits, B, H, M, D] / [.., Dv] (dv's empty
    without dout)."""
    B, H, N, D = q.shape
    f32 = dict(dtype=torch.float32, device=q.device)
    dk_part = torch.empty(splits, B, H, k.shape[2], D, **f32)
    dv_part = torch.empty(splits, B, H, k.shape[2], v.shape[3], **f32) if has_do else torch.empty(0, **f32)
    return torch.empty_like(q), dk_part, dv_part


def fixed_config(args, constexprs) -> triton.Config:
    """The one tile a backward launch runs (no autotuning: the order in which a split's tiles add
    into its dk/dv partials must not depend on a tuning run): the first config the autotuning
    policy keeps for the launch (``prune_bwd_configs``), a function of the shapes only."""
    named = dict(zip(_xattn_bwd_kernel.arg_names, args), **constexprs)
    return prune_bwd_configs(autotune_configs(), named)[0]


def xattn_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    select: Optional[torch.Tensor],
    scale: float,
    mean_heads: bool,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: Optional[torch.Tensor],
    dmaps: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of one forward pass; each has its input's strides and dtype (dv is empty when
    v is None). dq is written by the kernel; dk/dv are fp32 partials summed over the splits in a
    fixed order (bitwise reproducible) by one launch each.
    """
    B, H, N, _ = q.shape
    has_do = v is not None and dout is not None
    has_g = select is not None and dmaps is not None
    if not (has_do or has_g) or N == 0 or B == 0 or H == 0:
        dv = torch.zeros_like(v) if v is not None else q.new_empty(0)
        return torch.zeros_like(q), torch.zeros_like(k), dv

    splits, rows_per_split = backward_splits(N, B * H)
    dq, dk_part, dv_part = allocate(q, k, v, has_do, splits)
    args, constexprs = launch_args(q, k, v, bias, select, scale, mean_heads, out, lse, dout, dmaps,
                                   dq, dk_part, dv_part, rows_per_split)
    grid = (splits, B * H)
    with device_guard(q):
        if interpreting():
            _xattn_bwd_kernel[grid](*args, **constexprs, **INTERPRETER_CONFIG)
        else:
            cfg = fixed_config(args, constexprs)
            _xattn_bwd_kernel[grid](*args, **constexprs, **cfg.all_kwargs())
        dk = sum_splits_into(dk_part, torch.empty_like(k))
        if v is None:
            dv = q.new_empty(0)
        elif has_do:
            dv = sum_splits_into(dv_part, torch.empty_like(v))
        else:
            dv = torch.zeros_like(v)
    return dq, dk, dv
