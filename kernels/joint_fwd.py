"""Key-blocked forward over joint key sets: cross-attention with selected maps, and the
subject-wise loss with the split log-sum-exp (``joint_xattn_fwd``, ``joint_subject_fwd``).

One kernel serves both ops (the subject op is the cross-attention pass plus the reference keys,
flag ``HAS_REF``). It walks the keys in BLOCK_N blocks with the online softmax (any M), carries the
selected columns as extra value columns and writes per-head maps of the map query range; a small
epilogue (a head mean, the loss) runs on those [B, H, N_map, S] maps. Nothing [B, H, N, M] exists.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import LOG2E, device_guard, select_block
from ._joint import (any_token_in, block_logits, carry_columns, dim_block, online_update, ref_token_positions,
                     row_stats, shifted, strides_or_zeros, tiles)
from ._utils import dot_precision, dot_upcast, interpreting


@triton.jit
def _target_keys(q, m_t, l_t, acc, a_t, m_o, l_o, a_ro, lo, hi,
                 k_ptr, v_ptr, bias_ptr, stride_kn, stride_kd, stride_vn, stride_vd, stride_biasn,
                 tok, rt_k, s_mask, tile_in, offs_d, d_mask, offs_dv, dv_mask, sm_scale,
                 BLOCK_N: tl.constexpr, OUTSIDE: tl.constexpr, HAS_V: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_SEL: tl.constexpr, SPLIT_DOT: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """Online softmax over the target keys [lo, hi): running max m_t, sum l_t, output acc and
    selected columns a_t, all relative to exp(−m_t). OUTSIDE keys (outside the reference segment)
    also feed the reference's statistics at their own max m_o: sum l_o and the columns a_ro of
    the reference tokens that land on them (their max is kept apart: a segment whose logits
    dominate must not flush the outside keys' sum to zero before the reference needs it)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        s, _ = block_logits(q, k_ptr, stride_kn, stride_kd, bias_ptr, stride_biasn, offs_n, n_mask,
                            offs_d, d_mask, sm_scale, HAS_BIAS, DOT_PRECISION, DOT_UPCAST)
        if OUTSIDE:
            m_new_o, _, alpha_o, p = online_update(m_o, s)
            l_o = l_o * alpha_o + tl.sum(p, axis=1)
            a_ro = a_ro * alpha_o[:, None]
            a_ro = carry_columns(a_ro, p, rt_k, s_mask, offs_n,
                                 any_token_in(rt_k, s_mask, start_n, start_n + BLOCK_N) & tile_in, SPLIT_DOT)
            m_o = m_new_o
            m_new = tl.maximum(m_t, m_new_o)
            shift = shifted(m_new)
            alpha = tl.math.exp2((m_t - shift) * LOG2E)
            p = p * tl.math.exp2((m_new_o - shift) * LOG2E)[:, None]  # to the target's frame (<= 1)
        else:
            m_new, shift, alpha, p = online_update(m_t, s)
        l_t = l_t * alpha + tl.sum(p, axis=1)
        if HAS_SEL:
            a_t = a_t * alpha[:, None]
            a_t = carry_columns(a_t, p, tok, s_mask, offs_n,
                                any_token_in(tok, s_mask, start_n, start_n + BLOCK_N) & tile_in, SPLIT_DOT)
        if HAS_V:
            v = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                        mask=n_mask[:, None] & dv_mask[None, :], other=0.0)
            acc = acc * alpha[:, None]
            if DOT_UPCAST:
                acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_t = m_new
    return m_t, l_t, acc, a_t, m_o, l_o, a_ro


@triton.jit
def _joint_fwd_kernel(
    Q, K, V, KR, BIAS, RBIAS, TOK, RTOK, O, LSE, LSER, AT, AR,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_krb, stride_krh, stride_krn, stride_krd,
    stride_biasb, stride_biash, stride_biasn,
    stride_rbiasb, stride_rbiash, stride_rbiasn,
    stride_tokb, stride_toks, stride_rtokb, stride_rtoks,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lseb, stride_lseh, stride_lsem,
    stride_ab, stride_ah, stride_am, stride_as,
    H, N_Q, N_KV, N_REF, NUM_SEL, MAP_START, MAP_STOP, SEG_START, SEG_STOP,
    sm_scale,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_V: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEL: tl.constexpr, HAS_REF: tl.constexpr,
    HAS_RBIAS: tl.constexpr, WRITE_LSER: tl.constexpr, SPLIT_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """One BLOCK_M tile of query rows of one head, all keys in BLOCK_N blocks.

    Formula, per row m (s = q·kᵀ·scale + bias; the reference sequence r = [k outside the segment
    [SEG_START, SEG_STOP), k_ref] with ``RTOK`` positions on cat(k[:SEG_START], k_ref, k[SEG_STOP:]))::

        LSE[m]  = ln Σ_n exp(s[m, n])             O[m] = Σ_n exp(s[m, n] − LSE[m]) v[n]     (HAS_V)
        AT[m, j] = exp(s[m, TOK[j]] − LSE[m])                  for MAP_START <= m < MAP_STOP (HAS_SEL)
        L_out = ln Σ_{n outside} exp(s[m, n]),  L_R = ln Σ_i exp(q·k_ref[i]·scale + rbias[i])
        LSER[m] = logaddexp(L_out, L_R)           AR[m, j] = exp(r-logit[m, RTOK[j]] − LSER[m]) (HAS_REF)

    LSER is written for the map rows (+inf elsewhere: no reference there). A row whose keys are all
    -inf gives O = 0, maps 0 and lse = +inf. Grid: ``(cdiv(N_Q, BLOCK_M), B * H)`` (one program per
    row tile and head, so a Flux layer at B = 1 runs 72 x 24 programs); every program writes only
    its own rows: no atomics, deterministic. Without HAS_REF the segment is the whole key range.

    Invariants: head and value dims in one masked tile each (BLOCK_D >= HEAD_DIM, BLOCK_DV >=
    VALUE_DIM); every load and store masked on rows, keys, dims and tokens; int64 batch/head
    offsets; fp32 accumulation; O cast to its own element type.
    """
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    tl.static_assert(BLOCK_DV >= VALUE_DIM)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = tl.cast(pid_bh // H, tl.int64)
    off_h = tl.cast(pid_bh % H, tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_s = tl.arange(0, BLOCK_S)
    m_mask = offs_m < N_Q
    d_mask = offs_d < HEAD_DIM
    dv_mask = offs_dv < VALUE_DIM
    s_mask = offs_s < NUM_SEL
    in_map = m_mask & (offs_m >= MAP_START) & (offs_m < MAP_STOP)
    tile_in = (pid_m * BLOCK_M < MAP_STOP) & (pid_m * BLOCK_M + BLOCK_M > MAP_START)

    # The query tile stays in registers for the whole key walk.
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    k_ptr = K + off_b * stride_kb + off_h * stride_kh
    v_ptr = V + off_b * stride_vb + off_h * stride_vh
    bias_ptr = BIAS + off_b * stride_biasb + off_h * stride_biash
    tok = tl.full([BLOCK_S], -1, tl.int64)
    rt_k = tl.full([BLOCK_S], -1, tl.int64)
    if HAS_SEL:
        tok = tl.load(TOK + off_b * stride_tokb + offs_s * stride_toks, mask=s_mask, other=-1).to(tl.int64)
    if HAS_REF:
        rtok = tl.load(RTOK + off_b * stride_rtokb + offs_s * stride_rtoks, mask=s_mask, other=-1).to(tl.int64)
        rt_k, rt_r = ref_token_positions(rtok, s_mask, SEG_START, SEG_STOP, N_REF)

    m_t = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_t = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    a_t = tl.zeros([BLOCK_M, BLOCK_S], dtype=tl.float32)
    m_o = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_o = tl.zeros([BLOCK_M], dtype=tl.float32)
    a_ro = tl.zeros([BLOCK_M, BLOCK_S], dtype=tl.float32)
    if HAS_REF:  # left of the segment, the segment, right of it: each block in one class
        m_t, l_t, acc, a_t, m_o, l_o, a_ro = _target_keys(
            q, m_t, l_t, acc, a_t, m_o, l_o, a_ro, 0, SEG_START, k_ptr, v_ptr, bias_ptr,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_biasn, tok, rt_k, s_mask, tile_in,
            offs_d, d_mask, offs_dv, dv_mask, sm_scale, BLOCK_N, True, HAS_V, HAS_BIAS, HAS_SEL,
            SPLIT_DOT, DOT_PRECISION, DOT_UPCAST)
        m_t, l_t, acc, a_t, m_o, l_o, a_ro = _target_keys(
            q, m_t, l_t, acc, a_t, m_o, l_o, a_ro, SEG_START, SEG_STOP, k_ptr, v_ptr, bias_ptr,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_biasn, tok, rt_k, s_mask, tile_in,
            offs_d, d_mask, offs_dv, dv_mask, sm_scale, BLOCK_N, False, HAS_V, HAS_BIAS, HAS_SEL,
            SPLIT_DOT, DOT_PRECISION, DOT_UPCAST)
        m_t, l_t, acc, a_t, m_o, l_o, a_ro = _target_keys(
            q, m_t, l_t, acc, a_t, m_o, l_o, a_ro, SEG_STOP, N_KV, k_ptr, v_ptr, bias_ptr,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_biasn, tok, rt_k, s_mask, tile_in,
            offs_d, d_mask, offs_dv, dv_mask, sm_scale, BLOCK_N, True, HAS_V, HAS_BIAS, HAS_SEL,
            SPLIT_DOT, DOT_PRECISION, DOT_UPCAST)
    else:
        m_t, l_t, acc, a_t, m_o, l_o, a_ro = _target_keys(
            q, m_t, l_t, acc, a_t, m_o, l_o, a_ro, 0, N_KV, k_ptr, v_ptr, bias_ptr,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_biasn, tok, rt_k, s_mask, tile_in,
            offs_d, d_mask, offs_dv, dv_mask, sm_scale, BLOCK_N, False, HAS_V, HAS_BIAS, HAS_SEL,
            SPLIT_DOT, DOT_PRECISION, DOT_UPCAST)

    inv_t, lse_t = row_stats(shifted(m_t), l_t)
    lse_off = off_b * stride_lseb + off_h * stride_lseh + offs_m * stride_lsem
    tl.store(LSE + lse_off, lse_t, mask=m_mask)
    if HAS_V:
        tl.store(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om
                 + offs_dv[None, :] * stride_od, (acc * inv_t[:, None]).to(O.dtype.element_ty),
                 mask=m_mask[:, None] & dv_mask[None, :])
    map_off = (off_b * stride_ab + off_h * stride_ah + (offs_m - MAP_START)[:, None] * stride_am
               + offs_s[None, :] * stride_as)
    map_mask = in_map[:, None] & s_mask[None, :]
    if HAS_SEL:
        tl.store(AT + map_off, a_t * inv_t[:, None], mask=map_mask)

    if HAS_REF:
        # The reference's own keys, only for tiles holding map rows (it costs only these keys).
        kr_ptr = KR + off_b * stride_krb + off_h * stride_krh
        rbias_ptr = RBIAS + off_b * stride_rbiasb + off_h * stride_rbiash
        m_r = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_r = tl.zeros([BLOCK_M], dtype=tl.float32)
        a_rr = tl.zeros([BLOCK_M, BLOCK_S], dtype=tl.float32)
        ref_hi = tl.where(tile_in, N_REF, 0)
        for start_n in range(0, ref_hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            s, _ = block_logits(q, kr_ptr, stride_krn, stride_krd, rbias_ptr, stride_rbiasn, offs_n,
                                offs_n < N_REF, offs_d, d_mask, sm_scale, HAS_RBIAS, DOT_PRECISION,
                                DOT_UPCAST)
            m_new, _, alpha, p = online_update(m_r, s)
            l_r = l_r * alpha + tl.sum(p, axis=1)
            a_rr = carry_columns(a_rr * alpha[:, None], p, rt_r, s_mask, offs_n,
                                 any_token_in(rt_r, s_mask, start_n, start_n + BLOCK_N), SPLIT_DOT)
            m_r = m_new
        # lse_r = logaddexp(L_out, L_R), both parts brought to their common max.
        shift = shifted(tl.maximum(m_o, m_r))
        c_o = tl.math.exp2((m_o - shift) * LOG2E)
        c_r = tl.math.exp2((m_r - shift) * LOG2E)
        inv_r, lse_r = row_stats(shift, l_o * c_o + l_r * c_r)
        tl.store(AR + map_off, (a_ro * c_o[:, None] + a_rr * c_r[:, None]) * inv_r[:, None], mask=map_mask)
        if WRITE_LSER:
            tl.store(LSER + lse_off, tl.where(in_map, lse_r, float("inf")), mask=m_mask)


def launch(q, k, v, bias, tokens, scale, map_range, out, lse, a_t, k_ref=None, ref_bias=None,
           ref_tokens=None, segment=None, lse_ref=None, a_r=None):
    """(args, constexprs, grid, num_warps) of one launch; the compile check calls it with meta
    tensors, so it compiles exactly what runs. ``a_t`` / ``a_r``: per-head maps [B, H, N_map, S]
    (same strides); ``segment`` (start, stop) only with ``k_ref``."""
    B, H, N, D = q.shape
    M = k.shape[2]
    Dv = v.shape[3] if v is not None else 0
    S = tokens.shape[1] if tokens is not None else 0
    has_ref = k_ref is not None
    M_ref = k_ref.shape[2] if has_ref else 0
    seg = segment if has_ref else (0, M)
    block_m, block_n, warps = tiles(q.dtype, max(D, Dv), S, backward=False, ref=has_ref)
    maps_strides = tuple(a_t.stride()) if tokens is not None else (0,) * 4
    write_lser = has_ref and lse_ref is not None and lse_ref.numel() > 0
    args = (
        q, k, v if v is not None else q, k_ref if has_ref else q,
        bias if bias is not None else lse, ref_bias if ref_bias is not None else lse,
        tokens if tokens is not None else lse, ref_tokens if has_ref else lse,
        out if v is not None else q, lse, lse_ref if write_lser else lse,
        a_t if tokens is not None else lse, a_r if has_ref else lse,
        *q.stride(), *k.stride(), *strides_or_zeros(v, 4), *strides_or_zeros(k_ref, 4),
        *strides_or_zeros(bias, 3), *strides_or_zeros(ref_bias, 3), *strides_or_zeros(tokens, 2),
        *strides_or_zeros(ref_tokens if has_ref else None, 2),
        *(strides_or_zeros(out, 4) if v is not None else (0,) * 4), *lse.stride(), *maps_strides,
        H, N, M, M_ref, S, map_range[0], map_range[1], seg[0], seg[1],
        float(scale),
    )
    constexprs = dict(
        HEAD_DIM=D, VALUE_DIM=max(Dv, 1), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=dim_block(D),
        BLOCK_DV=dim_block(Dv), BLOCK_S=select_block(S), HAS_V=v is not None,
        HAS_BIAS=bias is not None, HAS_SEL=tokens is not None, HAS_REF=has_ref,
        HAS_RBIAS=ref_bias is not None, WRITE_LSER=write_lser, SPLIT_DOT=not interpreting(),
        DOT_PRECISION=dot_precision(q.dtype), DOT_UPCAST=dot_upcast(q.dtype),
    )
    return args, constexprs, (triton.cdiv(N, block_m), B * H), warps


def _run(args, constexprs, grid, warps, q):
    if grid[0] * grid[1] == 0:
        return
    with device_guard(q):
        _joint_fwd_kernel[grid](*args, **constexprs, num_warps=warps, num_stages=1)


def _per_head_maps(q, num_map_rows: int, S: int) -> torch.Tensor:
    B, H = q.shape[:2]
    return torch.empty(B, H, num_map_rows, S, dtype=torch.float32, device=q.device)


def allocate(q, v):
    """out [B, H, N, Dv] over [B, N, H, Dv] memory (empty when v is None) and lse [B, H, N] fp32."""
    B, H, N, _ = q.shape
    out = (torch.empty(B, N, H, v.shape[3], dtype=q.dtype, device=q.device).transpose(1, 2)
           if v is not None else q.new_empty(0))
    return out, torch.empty(B, H, N, dtype=torch.float32, device=q.device)


def joint_xattn_fwd(q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    select: Optional[torch.Tensor], scale: float, mean_heads: bool, map_start: int,
                    map_stop: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, maps) of cross-attention over any number of keys (layouts of semfid.backends.base;
    maps [B, N_map, S] head mean or [B, H, N_map, S], N_map = map_stop − map_start).

    q [B, H, N, D], k/v [B, H, M, D/Dv] (v None: maps only), bias [B, H, M] fp32 or None, select
    [B, S] int64 or None; any strides with unit last stride for k/v. One launch (+ a head mean)."""
    out, lse = allocate(q, v)
    n_map, S = map_stop - map_start, (select.shape[1] if select is not None else 0)
    a_t = _per_head_maps(q, n_map, S) if select is not None else lse.new_empty(0)
    _run(*launch(q, k, v, bias, select, scale, (map_start, map_stop), out, lse, a_t), q)
    if select is None:
        return out, lse, lse.new_empty(0)
    return out, lse, (a_t.mean(dim=1) if mean_heads else a_t)


def subject_epilogue(a_t, a_r, weights, mean_heads: bool):
    """(loss [B], maps, diff) from per-head A_t / A_r [B, H, N_map, S] (fixed-order torch sums):
    diff = A_t − A_r (head means first with mean_heads), loss[b] = Σ w·diff² / (N_map·H_red)."""
    B, H, n_map, S = a_t.shape
    w = weights if weights is not None else a_t.new_full((B, S), 1.0 / max(S, 1))
    if mean_heads:
        maps = a_t.mean(dim=1)
        diff = maps - a_r.mean(dim=1)
        loss = (diff.square() * w[:, None, :]).sum(dim=(1, 2)) / n_map
        return loss, maps, diff
    diff = a_t - a_r
    loss = (diff.square() * w[:, None, None, :]).sum(dim=(1, 2, 3)) / (n_map * H)
    return loss, a_t, diff


def joint_subject_fwd(q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, weights, scale, mean_heads,
                      detach_reference, return_maps, map_start, map_stop, seg_start, seg_stop):
    """(out, lse, lse_ref, loss, maps, diff) of the subject op over a joint key set.

    A_t over all keys of ``k``; A_r over ``cat(k[:seg_start], k_ref, k[seg_stop:])`` (``ref_tokens``
    index that sequence). lse_ref [B, H, N] (+inf outside the map rows) unless the reference is
    detached with head-mean maps; diff [B, N_map, S] with mean_heads, else empty (the backward
    recomputes per-head maps). An empty map range gives a NaN loss (the mean over no queries)."""
    out, lse = allocate(q, v)
    n_map, S = map_stop - map_start, tokens.shape[1]
    lse_ref = lse.new_empty(0) if (mean_heads and detach_reference) else torch.empty_like(lse)
    a_t, a_r = _per_head_maps(q, n_map, S), _per_head_maps(q, n_map, S)
    _run(*launch(q, k, v, bias, tokens, scale, (map_start, map_stop), out, lse, a_t, k_ref, ref_bias,
                 ref_tokens, (seg_start, seg_stop), lse_ref, a_r), q)
    loss, maps, diff = subject_epilogue(a_t, a_r, weights, mean_heads)
    return (out, lse, lse_ref, loss, maps if return_maps else lse.new_empty(0),
            diff if mean_heads else lse.new_empty(0))
