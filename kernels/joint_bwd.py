"""Key-blocked backward over joint key sets (``joint_xattn_bwd``, ``joint_subject_bwd``).

Three passes, each writing only what it owns (deterministic, no atomics, no partials):
the per-row pass (:mod:`.joint_bwd_prep`: delta, delta_r, the map gradients), the dq pass (a
program per query tile walks the keys) and the dk/dv pass (a program per key block walks the
queries), flash-attention's two-loop backward. P is recomputed from the saved lse; the map
gradient G is scattered onto the selected columns of dP in the key blocks that hold a token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LOG2E, device_guard, select_block
from ._joint import (SCATTER_CHUNK, any_token_in, block_logits, dim_block, key_blocks, ref_token_positions,
                     scatter_columns,
                     strides_or_zeros, tiles)
from ._utils import dot_precision, dot_upcast, interpreting, mma
from .joint_bwd_dkdv import _joint_bwd_dkdv_kernel
from .joint_bwd_prep import _joint_bwd_prep_kernel


@triton.jit
def _ds_block(s, lse, delta, dp):
    """dS = P ⊙ (dP − delta) with P = exp(s − lse) (lse = +inf gives P = 0), and P."""
    p = tl.math.exp2((s - lse[:, None]) * LOG2E)
    return p * (dp - delta[:, None]), p


@triton.jit
def _dq_keys(q, do, lse, delta, gt_ptr, lse_r, delta_r, gr_ptr, dq, lo, hi, k_ptr, v_ptr, bias_ptr,
             stride_kn, stride_kd, stride_vn, stride_vd, stride_biasn, tok, rt_k, s_mask, tile_in,
             offs_d, d_mask, offs_dv, dv_mask, sm_scale, g_rows, in_map, stride_gm, stride_gs,
             tok_ptr, stride_toks, rtok_ptr, stride_rtoks, NUM_SEL, SEG_START, SEG_STOP, N_REF,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SC: tl.constexpr, OUTSIDE_REF: tl.constexpr,
             HAS_DO: tl.constexpr, HAS_G: tl.constexpr, HAS_BIAS: tl.constexpr,
             SPLIT_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """dq += dS·k over the keys [lo, hi); OUTSIDE_REF keys also carry the reference's dS_r."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        s, k = block_logits(q, k_ptr, stride_kn, stride_kd, bias_ptr, stride_biasn, offs_n, n_mask,
                            offs_d, d_mask, sm_scale, HAS_BIAS, DOT_PRECISION, DOT_UPCAST)
        dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if HAS_DO:
            v = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                        mask=n_mask[:, None] & dv_mask[None, :], other=0.0)
            dp = mma(do, tl.trans(v), dp, DOT_PRECISION, DOT_UPCAST)
        if HAS_G:
            dp = scatter_columns(dp, gt_ptr, g_rows, in_map, stride_gm, stride_gs, tok_ptr, stride_toks, NUM_SEL,
                                 offs_n, any_token_in(tok, s_mask, start_n, start_n + BLOCK_N) & tile_in,
                                 SEG_START, SEG_STOP, N_REF, 0, BLOCK_SC, SPLIT_DOT)
        ds, _ = _ds_block(s, lse, delta, dp)
        if OUTSIDE_REF:
            dp_r = scatter_columns(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), gr_ptr, g_rows, in_map,
                                   stride_gm, stride_gs, rtok_ptr, stride_rtoks, NUM_SEL, offs_n,
                                   any_token_in(rt_k, s_mask, start_n, start_n + BLOCK_N) & tile_in,
                                   SEG_START, SEG_STOP, N_REF, 1, BLOCK_SC, SPLIT_DOT)
            ds_r, _ = _ds_block(s, lse_r, delta_r, dp_r)
            ds += ds_r
        dq = mma(ds, k, dq, DOT_PRECISION, DOT_UPCAST)
    return dq


@triton.jit
def _joint_bwd_dq_kernel(
    Q, K, V, KR, BIAS, RBIAS, TOK, RTOK, LSE, LSER, DELTA, DELTAR, DO, GT, GR, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_krb, stride_krh, stride_krn, stride_krd,
    stride_biasb, stride_biash, stride_biasn,
    stride_rbiasb, stride_rbiash, stride_rbiasn,
    stride_tokb, stride_toks, stride_rtokb, stride_rtoks,
    stride_lseb, stride_lseh, stride_lsem,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_gb, stride_gh, stride_gm, stride_gs,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, N_Q, N_KV, N_REF, NUM_SEL, MAP_START, MAP_STOP, SEG_START, SEG_STOP, sm_scale,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_SC: tl.constexpr,
    HAS_DO: tl.constexpr, HAS_G: tl.constexpr, REF_GRAD: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RBIAS: tl.constexpr, SPLIT_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """dq of one BLOCK_M query tile of one head, the keys walked in BLOCK_N blocks.

    Formula (P_t = exp(s − LSE), P_r = exp(s_r − LSER) over the reference sequence)::

        dS_t = P_t ⊙ (dO·vᵀ + scatter(G_t) − DELTA)       dS_r = P_r ⊙ (scatter(G_r) − DELTAR)
        dQ   = (dS_t·k + dS_r·[k outside the segment; k_ref]) · scale      (dS_r with REF_GRAD)

    Grid ``(cdiv(N_Q, BLOCK_M), B * H)``; each program writes its rows of dQ (cast to dQ's type).
    """
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
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    do = tl.zeros([BLOCK_M, BLOCK_DV], dtype=DO.dtype.element_ty)
    if HAS_DO:
        do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom
                     + offs_dv[None, :] * stride_dod, mask=m_mask[:, None] & dv_mask[None, :], other=0.0)
    lse_off = off_b * stride_lseb + off_h * stride_lseh + offs_m * stride_lsem
    lse = tl.load(LSE + lse_off, mask=m_mask, other=float("inf"))
    delta = tl.load(DELTA + lse_off, mask=m_mask, other=0.0)
    gt_ptr = GT + off_b * stride_gb + off_h * stride_gh
    gr_ptr = GR + off_b * stride_gb + off_h * stride_gh
    g_rows = offs_m - MAP_START
    tok_ptr = TOK + off_b * stride_tokb
    rtok_ptr = RTOK + off_b * stride_rtokb
    tok = tl.full([BLOCK_S], -1, tl.int32)
    if HAS_G:
        tok = tl.load(TOK + off_b * stride_tokb + offs_s * stride_toks, mask=s_mask, other=-1).to(tl.int32)
    lse_r = tl.full([BLOCK_M], float("inf"), tl.float32)
    delta_r = tl.zeros([BLOCK_M], dtype=tl.float32)
    rt_k = tl.full([BLOCK_S], -1, tl.int32)
    rt_r = tl.full([BLOCK_S], -1, tl.int32)
    if REF_GRAD:
        lse_r = tl.load(LSER + lse_off, mask=m_mask, other=float("inf"))
        delta_r = tl.load(DELTAR + lse_off, mask=m_mask, other=0.0)
        rtok = tl.load(RTOK + off_b * stride_rtokb + offs_s * stride_rtoks, mask=s_mask, other=-1).to(tl.int32)
        rt_k, rt_r = ref_token_positions(rtok, s_mask, SEG_START, SEG_STOP, N_REF)

    k_ptr = K + off_b * stride_kb + off_h * stride_kh
    v_ptr = V + off_b * stride_vb + off_h * stride_vh
    bias_ptr = BIAS + off_b * stride_biasb + off_h * stride_biash
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if REF_GRAD:  # left of the segment, the segment, right of it
        dq = _dq_keys(q, do, lse, delta, gt_ptr, lse_r, delta_r, gr_ptr, dq, 0, SEG_START, k_ptr, v_ptr, bias_ptr,
                      stride_kn, stride_kd, stride_vn, stride_vd, stride_biasn, tok, rt_k, s_mask, tile_in,
                      offs_d, d_mask, offs_dv, dv_mask, sm_scale, g_rows, in_map, stride_gm, stride_gs, tok_ptr,
                      stride_toks, rtok_ptr, stride_rtoks, NUM_SEL, SEG_START, SEG_STOP, N_REF, BLOCK_M, BLOCK_N,
                      BLOCK_SC, True, HAS_DO, HAS_G,
                      HAS_BIAS, SPLIT_DOT, DOT_PRECISION, DOT_UPCAST)
        dq = _dq_keys(q, do, lse, delta, gt_ptr, lse_r, delta_r, gr_ptr, dq, SEG_START, SEG_STOP, k_ptr, v_ptr,
                      bias_ptr, stride_kn, stride_kd, stride_vn, stride_vd, stride_biasn, tok, rt_k, s_mask,
                      tile_in, offs_d, d_mask, offs_dv, dv_mask, sm_scale, g_rows, in_map, stride_gm, stride_gs, tok_ptr,
                      stride_toks, rtok_ptr, stride_rtoks, NUM_SEL, SEG_START, SEG_STOP, N_REF, BLOCK_M, BLOCK_N,
                      BLOCK_SC, False, HAS_DO,
                      HAS_G, HAS_BIAS, SPLIT_DOT, DOT_PRECISION, DOT_UPCAST)
        dq = _dq_keys(q, do, lse, delta, gt_ptr, lse_r, delta_r, gr_ptr, dq, SEG_STOP, N_KV, k_ptr, v_ptr, bias_ptr,
                      stride_kn, stride_kd, stride_vn, stride_vd, stride_biasn, tok, rt_k, s_mask, tile_in,
                      offs_d, d_mask, offs_dv, dv_mask, sm_scale, g_rows, in_map, stride_gm, stride_gs, tok_ptr,
                      stride_toks, rtok_ptr, stride_rtoks, NUM_SEL, SEG_START, SEG_STOP, N_REF, BLOCK_M, BLOCK_N,
                      BLOCK_SC, True, HAS_DO, HAS_G,
                      HAS_BIAS, SPLIT_DOT, DOT_PRECISION, DOT_UPCAST)
        # The reference's own keys, for tiles holding map rows only.
        kr_ptr = KR + off_b * stride_krb + off_h * stride_krh
        rbias_ptr = RBIAS + off_b * stride_rbiasb + off_h * stride_rbiash
        for start_n in range(0, tl.where(tile_in, N_REF, 0), BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            s, kr = block_logits(q, kr_ptr, stride_krn, stride_krd, rbias_ptr, stride_rbiasn, offs_n,
                                 offs_n < N_REF, offs_d, d_mask, sm_scale, HAS_RBIAS, DOT_PRECISION, DOT_UPCAST)
            dp_r = scatter_columns(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), gr_ptr, g_rows, in_map,
                                   stride_gm, stride_gs, rtok_ptr, stride_rtoks, NUM_SEL, offs_n,
                                   any_token_in(rt_r, s_mask, start_n, start_n + BLOCK_N),
                                   SEG_START, SEG_STOP, N_REF, 2, BLOCK_SC, SPLIT_DOT)
            ds_r, _ = _ds_block(s, lse_r, delta_r, dp_r)
            dq = mma(ds_r, kr, dq, DOT_PRECISION, DOT_UPCAST)
    else:
        dq = _dq_keys(q, do, lse, delta, gt_ptr, lse_r, delta_r, gr_ptr, dq, 0, N_KV, k_ptr, v_ptr, bias_ptr,
                      stride_kn, stride_kd, stride_vn, stride_vd, stride_biasn, tok, rt_k, s_mask, tile_in,
                      offs_d, d_mask, offs_dv, dv_mask, sm_scale, g_rows, in_map, stride_gm, stride_gs, tok_ptr,
                      stride_toks, rtok_ptr, stride_rtoks, NUM_SEL, SEG_START, SEG_STOP, N_REF, BLOCK_M, BLOCK_N,
                      BLOCK_SC, False, HAS_DO, HAS_G,
                      HAS_BIAS, SPLIT_DOT, DOT_PRECISION, DOT_UPCAST)
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqm
             + offs_d[None, :] * stride_dqd, (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])


# ---- launchers ---------------------------------------------------------------------------------
def _f32(q, *shape):
    return torch.empty(*shape, dtype=torch.float32, device=q.device)


def launches(q, k, v, bias, tokens, scale, map_range, lse, out, dout, dmaps, dq, dk, dv, *, k_ref=None,
             ref_bias=None, ref_tokens=None, segment=None, lse_ref=None, weights=None, diff=None,
             dloss=None, mean_heads=False, detach_reference=True, dk_ref=None):
    """[(kernel, grid, args, constexprs, num_warps)] of one backward, in launch order (prep, dq,
    dk/dv, dk_ref): the launcher runs them and the compile check compiles them (meta tensors).
    The per-row buffers (delta, delta_r, G_t, G_r) are allocated here."""
    B, H, N, D = q.shape
    M, Dv = k.shape[2], (v.shape[3] if v is not None else 0)
    S = tokens.shape[1] if tokens is not None else 0
    has_ref = k_ref is not None
    M_ref = k_ref.shape[2] if has_ref else 0
    seg = segment if has_ref else (0, M)
    n_map = map_range[1] - map_range[0]
    has_do = v is not None and dout is not None
    has_dmaps, has_dloss = tokens is not None and dmaps is not None, has_ref and dloss is not None
    has_g = has_dmaps or has_dloss
    ref_grad = has_ref and has_dloss and not detach_reference
    block_m, block_n, warps = tiles(q.dtype, max(D, Dv), S, backward=True, ref=ref_grad)
    delta = _f32(q, B, H, N)
    delta_r = _f32(q, B, H, N) if ref_grad else delta
    g_t = _f32(q, B, H, n_map, S) if has_g else delta
    g_r = _f32(q, B, H, n_map, S) if ref_grad else delta
    g_strides = tuple(g_t.stride()) if has_g else (0,) * 4
    lse_r = lse_ref if (lse_ref is not None and lse_ref.numel()) else lse
    absent = lse  # stands for absent tensors: their flags keep them unread
    kr = k_ref if has_ref else q
    if has_dmaps:
        dmap_strides = ((dmaps.stride(0), 0, dmaps.stride(1), dmaps.stride(2)) if mean_heads
                        else tuple(dmaps.stride()))
    else:
        dmap_strides = (0,) * 4
    rtok = ref_tokens if has_ref else (tokens if tokens is not None else absent)
    tok = tokens if tokens is not None else absent
    common = dict(BLOCK_M=block_m, BLOCK_D=dim_block(D), BLOCK_DV=dim_block(Dv), BLOCK_S=select_block(S),
                  HEAD_DIM=D, VALUE_DIM=max(Dv, 1), DOT_PRECISION=dot_precision(q.dtype),
                  DOT_UPCAST=dot_upcast(q.dtype))
    split = not interpreting()
    row_grid = (triton.cdiv(N, block_m), B * H)
    prep = (_joint_bwd_prep_kernel, row_grid, (
        q, k, kr, bias if bias is not None else absent, ref_bias if ref_bias is not None else absent, tok,
        rtok, weights if weights is not None else absent, lse, lse_r, out if has_do else q,
        dout if has_do else q, diff if (diff is not None and diff.numel()) else absent,
        dloss if has_dloss else absent, dmaps if has_dmaps else absent, delta, delta_r, g_t, g_r,
        *q.stride(), *k.stride(), *kr.stride(), *strides_or_zeros(bias, 3), *strides_or_zeros(ref_bias, 3),
        *strides_or_zeros(tokens, 2), *(ref_tokens.stride() if has_ref else (0, 0)),
        *strides_or_zeros(weights, 2), *lse.stride(), *(out.stride() if has_do else (0,) * 4),
        *(dout.stride() if has_do else (0,) * 4),
        *(diff.stride() if (mean_heads and has_dloss) else (0, 0, 0)),
        dloss.stride(0) if has_dloss else 0, *dmap_strides, *g_strides,
        H, N, M, M_ref, S, map_range[0], map_range[1], seg[0], seg[1],
        float(scale), 2.0 / (max(n_map, 1) * (1 if mean_heads else H)), 1.0 / H if mean_heads else 1.0,
    ), dict(common, BLOCK_S=16, HAS_DO=has_do, HAS_DMAPS=has_dmaps,
            HAS_DLOSS=has_dloss, HAS_REF=has_ref,
            MEAN_DIFF=bool(mean_heads and has_dloss), REF_GRAD=ref_grad,
            NEED_AR=has_ref and (ref_grad or (has_dloss and not mean_heads)), HAS_W=weights is not None,
            HAS_BIAS=bias is not None, HAS_RBIAS=ref_bias is not None), 4 if block_m == 16 else warps)
    flags = dict(common, BLOCK_N=block_n, BLOCK_SC=min(select_block(S), SCATTER_CHUNK), HAS_DO=has_do,
                 HAS_G=has_g, REF_GRAD=ref_grad, SPLIT_DOT=split)
    dq_m, dq_n, dq_warps = tiles(q.dtype, max(D, Dv), S, backward=True, ref=ref_grad, dq_pass=True)
    dq_launch = (_joint_bwd_dq_kernel, (triton.cdiv(N, dq_m), B * H), (
        q, k, v if has_do else q, kr, bias if bias is not None else absent,
        ref_bias if ref_bias is not None else absent, tok, rtok, lse, lse_r, delta, delta_r,
        dout if has_do else q, g_t, g_r, dq,
        *q.stride(), *k.stride(), *(v.stride() if has_do else (0,) * 4), *kr.stride(),
        *strides_or_zeros(bias, 3), *strides_or_zeros(ref_bias, 3), *strides_or_zeros(tokens, 2),
        *(ref_tokens.stride() if has_ref else (0, 0)), *lse.stride(),
        *(dout.stride() if has_do else (0,) * 4), *g_strides, *dq.stride(),
        H, N, M, M_ref, S, map_range[0], map_range[1], seg[0], seg[1], float(scale),
    ), dict(flags, BLOCK_M=dq_m, BLOCK_N=dq_n, HAS_BIAS=bias is not None, HAS_RBIAS=ref_bias is not None),
        dq_warps)

    def key_pass(keys, key_bias, cls, rows, is_ref, dkey, dval):
        n_keys = keys.shape[2]
        grid = (key_blocks(0, cls[0], block_n) + key_blocks(*cls, block_n) + key_blocks(cls[1], n_keys, block_n),
                B * H)
        return (_joint_bwd_dkdv_kernel, grid, (
            q, keys, v if (has_do and not is_ref) else q, key_bias if key_bias is not None else absent,
            tok, rtok, lse_r if is_ref else lse, delta_r if is_ref else delta, lse_r, delta_r,
            dout if has_do else q, g_r if is_ref else g_t, g_r, dkey, dval if dval is not None else dkey,
            *q.stride(), *keys.stride(), *(v.stride() if (has_do and not is_ref) else (0,) * 4),
            *strides_or_zeros(key_bias, 3), *strides_or_zeros(tokens, 2),
            *(ref_tokens.stride() if has_ref else (0, 0)), *lse.stride(),
            *(dout.stride() if has_do else (0,) * 4), *g_strides, *dkey.stride(),
            *(dval.stride() if dval is not None else (0,) * 4),
            H, n_keys, cls[0], cls[1], M_ref, S, map_range[0], map_range[1], seg[0], seg[1],
            rows[0], rows[1], float(scale),
        ), dict(flags, HAS_DO=has_do and not is_ref, HAS_G=has_g if not is_ref else True, IS_REF=is_ref,
                HAS_BIAS=key_bias is not None), warps)

    out_launches = [prep, dq_launch,
                    key_pass(k, bias, seg if ref_grad else (0, M), (0, N), False, dk, dv if has_do else None)]
    if ref_grad:
        out_launches.append(key_pass(k_ref, ref_bias, (0, M_ref), map_range, True, dk_ref, None))
    return out_launches


def _run(launch_list, q):
    with device_guard(q):
        for kernel, grid, args, constexprs, warps in launch_list:
            if grid[0] * grid[1]:
                kernel[grid](*args, **constexprs, num_warps=warps, num_stages=1)


def joint_xattn_bwd(q, k, v, bias, select, scale, mean_heads, map_start, map_stop, out, lse, dout, dmaps):
    """(dq, dk, dv) of :func:`semfid.kernels.joint_fwd.joint_xattn_fwd` (each with its input's
    strides and dtype; dv empty when v is None). Four launches: prep, dq, dk/dv."""
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    dv = torch.empty_like(v) if v is not None else q.new_empty(0)
    has_do = v is not None and dout is not None
    if not has_do and dmaps is None:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if v is not None and not has_do:
        dv.zero_()
    _run(launches(q, k, v, bias, select, scale, (map_start, map_stop), lse, out, dout,
                  dmaps if select is not None else None, dq, dk, dv, mean_heads=mean_heads), q)
    return dq, dk, dv


def joint_subject_bwd(q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, weights, scale, mean_heads,
                      detach_reference, map_start, map_stop, seg_start, seg_stop, out, lse, lse_ref, diff,
                      dout, dloss, dmaps):
    """(dq, dk, dv, dk_ref) of :func:`semfid.kernels.joint_fwd.joint_subject_fwd`; dk_ref is empty
    when the reference is detached, zero when no loss gradient arrives."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dk_ref = q.new_empty(0) if detach_reference else torch.empty_like(k_ref)
    if dout is None and dloss is None and dmaps is None:
        return dq.zero_(), dk.zero_(), dv.zero_(), dk_ref.zero_()
    if dout is None:
        dv.zero_()
    if not detach_reference and dloss is None:
        dk_ref.zero_()
    _run(launches(q, k, v, bias, tokens, scale, (map_start, map_stop), lse, out, dout, dmaps, dq, dk, dv,
                  k_ref=k_ref, ref_bias=ref_bias, ref_tokens=ref_tokens, segment=(seg_start, seg_stop),
                  lse_ref=lse_ref, weights=weights, diff=diff, dloss=dloss, mean_heads=mean_heads,
                  detach_reference=detach_reference, dk_ref=dk_ref), q)
    return dq, dk, dv, dk_ref
