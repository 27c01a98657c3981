"""Backward of the one-pass subject-wise attention loss, ``subject_bwd``.

One kernel pass recomputes P_t (and P_r when needed) from the saved lse, forms the map gradients
G_t / G_r from the loss gradient in registers, scatters them onto the selected keys by a one-hot
product and runs the softmax backward of both key sets: dq complete per tile, and fp32 partials of
dk, dv, dk_ref per (split, head), summed in a fixed order by one small kernel each.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import aligned8, aligned_strides, backward_splits, device_guard, exact_dot, one_hot, recompute_p, \
    select_block, sum_splits_into
from ._utils import dot_precision, dot_upcast, head_dim_block, interpreting, key_block, max_head_dim_block, mma
from .subject_fwd import _logits, _masked


@triton.jit
def _accumulate(part_ptr, x, offs_n, n_mask, d, d_mask, WIDTH: tl.constexpr, accumulate):
    """part[offs_n, d] (+)= x: the first tile of a split stores, later tiles load-add-store."""
    ptr = part_ptr + offs_n[:, None] * WIDTH + d[None, :]
    mask = n_mask[:, None] & d_mask[None, :]
    x += tl.load(ptr, mask=mask & accumulate[:, None], other=0.0)
    tl.store(ptr, x, mask=mask)


@triton.jit
def _subject_bwd_kernel(
    Q, K, V, KR, BIAS, RBIAS, TOK, RTOK, W, LSE, LSER, DIFF, DO, DLOSS, DMAPS,
    DQ, DK_PART, DV_PART, DKR_PART,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_krb, stride_krh, stride_krn, stride_krd,
    stride_biasb, stride_biash, stride_biasn,
    stride_rbiasb, stride_rbiash, stride_rbiasn,
    stride_tokb, stride_toks, stride_rtokb, stride_rtoks, stride_wb, stride_ws,
    stride_lseb, stride_lseh, stride_lsem,
    stride_db, stride_dm, stride_ds,
    stride_dob, stride_doh, stride_dom, stride_dod, stride_dlb,
    stride_gb, stride_gh, stride_gm, stride_gs,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, N_Q, N_KV, N_REF, NUM_SEL, ROWS_PER_SPLIT,
    sm_scale, grad_scale,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_NR: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
    MEAN_HEADS: tl.constexpr, REF_GRAD: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RBIAS: tl.constexpr, HAS_W: tl.constexpr, HAS_DO: tl.constexpr, HAS_DLOSS: tl.constexpr,
    HAS_DMAPS: tl.constexpr, NEED_PR: tl.constexpr, ALIGNED: tl.constexpr, SPLIT_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """Gradients of one head over one range of query rows.

    Formula (P recomputed from lse, never loaded; c = grad_scale · dloss[b] = 2 dloss[b] / (N·H_red);
    w the column weights; d = DIFF (head mean, saved) or A_t − A_r recomputed per head)::

        G_t   = c·w·d (+ dmaps),  G_r = −c·w·d         (÷ H per head with MEAN_HEADS)
        dP_t  = dO·Vᵀ + G_t·E_tᵀ                       (E = one-hot of the tokens: the scatter)
        dS_t  = P_t ⊙ (dP_t − rowsum(P_t ⊙ dP_t))      dS_r likewise from dP_r = G_r·E_rᵀ
        dQ    = (dS_t·K + dS_r·K_ref)·scale
        dK_part += dS_tᵀ·Q·scale,  dV_part += P_tᵀ·dO,  dKR_part += dS_rᵀ·Q·scale

    Grid: ``(splits, B * H)``; program (i, bh) owns rows [i·ROWS_PER_SPLIT, (i+1)·ROWS_PER_SPLIT)
    of head bh, writes their dQ and accumulates its own partials ``*_PART[i, bh]`` (contiguous
    fp32 [N_KV or N_REF, dim]), tile after tile in a fixed order: splits and tiles depend on the
    shapes only, so the summed dk / dv / dk_ref are bitwise reproducible.

    Reference tiles (NEED_PR) are computed when REF_GRAD (dk_ref wanted) or when per-head maps need A_r
    again (not MEAN_HEADS, with a loss gradient). P and dS are rounded to the input dtype only as
    ``tl.dot`` operands (flash-attention's choice).
    """
    tl.static_assert(BLOCK_N >= 16)
    tl.static_assert(BLOCK_S >= 16)
    stride_qb, stride_qh, stride_qm = aligned_strides(stride_qb, stride_qh, stride_qm, ALIGNED)
    stride_kb, stride_kh, stride_kn = aligned_strides(stride_kb, stride_kh, stride_kn, ALIGNED)
    stride_vb, stride_vh, stride_vn = aligned_strides(stride_vb, stride_vh, stride_vn, ALIGNED)
    stride_krb, stride_krh, stride_krn = aligned_strides(stride_krb, stride_krh, stride_krn, ALIGNED)
    stride_dob, stride_doh, stride_dom = aligned_strides(stride_dob, stride_doh, stride_dom, ALIGNED)
    stride_dqb, stride_dqh, stride_dqm = aligned_strides(stride_dqb, stride_dqh, stride_dqm, ALIGNED)
    pid_split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = tl.cast(pid_bh // H, tl.int64)
    off_h = tl.cast(pid_bh % H, tl.int64)
    part = tl.cast(pid_split, tl.int64) * tl.num_programs(1) + pid_bh

    q_ptr = Q + off_b * stride_qb + off_h * stride_qh
    k_ptr = K + off_b * stride_kb + off_h * stride_kh
    kr_ptr = KR + off_b * stride_krb + off_h * stride_krh
    v_ptr = V + off_b * stride_vb + off_h * stride_vh
    do_ptr = DO + off_b * stride_dob + off_h * stride_doh
    dq_ptr = DQ + off_b * stride_dqb + off_h * stride_dqh
    lse_ptr = LSE + off_b * stride_lseb + off_h * stride_lseh
    lser_ptr = LSER + off_b * stride_lseb + off_h * stride_lseh
    dk_ptr = DK_PART + part * N_KV * HEAD_DIM
    dv_ptr = DV_PART + part * N_KV * VALUE_DIM
    dkr_ptr = DKR_PART + part * N_REF * HEAD_DIM
    if MEAN_HEADS:
        g_ptr = DMAPS + off_b * stride_gb
    else:
        g_ptr = DMAPS + off_b * stride_gb + off_h * stride_gh

    offs_n = tl.arange(0, BLOCK_N)
    offs_nr = tl.arange(0, BLOCK_NR)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_s = tl.arange(0, BLOCK_S)
    n_mask = offs_n < N_KV
    nr_mask = offs_nr < N_REF
    s_mask = offs_s < NUM_SEL
    tok = tl.load(TOK + off_b * stride_tokb + offs_s * stride_toks, mask=s_mask, other=0)
    rtok = tl.load(RTOK + off_b * stride_rtokb + offs_s * stride_rtoks, mask=s_mask, other=0)
    # c · w per column, as a [BLOCK_S] vector (dloss[b] loaded into every lane: no scalar loads).
    cw = tl.zeros([BLOCK_S], dtype=tl.float32)
    if HAS_DLOSS:
        cw = tl.load(DLOSS + off_b * stride_dlb + offs_s * 0).to(tl.float32) * grad_scale
        if HAS_W:
            cw = cw * tl.load(W + off_b * stride_wb + offs_s * stride_ws, mask=s_mask, other=0.0).to(tl.float32)
        else:
            cw = cw / NUM_SEL
        cw = tl.where(s_mask, cw, 0.0)
    if MEAN_HEADS:
        head_share = 1.0 / H
    else:
        head_share = 1.0

    row_start = pid_split * ROWS_PER_SPLIT
    row_end = tl.minimum(row_start + ROWS_PER_SPLIT, N_Q)
    for start_m in range(row_start, row_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < row_end
        # First tile of the split initialises the partials (a vector: see xattn_bwd).
        accumulate = (tl.zeros([BLOCK_N], dtype=tl.int32) + start_m) > row_start
        accumulate_r = (tl.zeros([BLOCK_NR], dtype=tl.int32) + start_m) > row_start

        s_t = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        s_r = tl.zeros([BLOCK_M, BLOCK_NR], dtype=tl.float32)
        for d0 in range(0, HEAD_DIM, BLOCK_D):
            d = d0 + offs_d
            d_mask = d < HEAD_DIM
            q = tl.load(q_ptr + offs_m[:, None] * stride_qm + d[None, :] * stride_qd,
                        mask=m_mask[:, None] & d_mask[None, :], other=0.0)
            s_t = _logits(s_t, q, k_ptr, stride_kn, stride_kd, d, offs_n, n_mask, d_mask,
                          DOT_PRECISION, DOT_UPCAST)
            if NEED_PR:
                s_r = _logits(s_r, q, kr_ptr, stride_krn, stride_krd, d, offs_nr, nr_mask, d_mask,
                              DOT_PRECISION, DOT_UPCAST)
        s_t = _masked(s_t, BIAS + off_b * stride_biasb + off_h * stride_biash, stride_biasn,
                      offs_n, n_mask, sm_scale, HAS_BIAS)
        # Rows past the end load lse = +inf: their P is 0, so they add nothing.
        p_t = recompute_p(s_t, tl.load(lse_ptr + offs_m * stride_lsem, mask=m_mask, other=float("inf")))
        e_t = one_hot(tok, s_mask, offs_n, True)
        if NEED_PR:
            s_r = _masked(s_r, RBIAS + off_b * stride_rbiasb + off_h * stride_rbiash, stride_rbiasn,
                          offs_nr, nr_mask, sm_scale, HAS_RBIAS)
            p_r = recompute_p(s_r, tl.load(lser_ptr + offs_m * stride_lsem, mask=m_mask,
                                           other=float("inf")))
            e_r = one_hot(rtok, s_mask, offs_nr, True)

        # Map gradients [BLOCK_M, BLOCK_S].
        g_t = tl.zeros([BLOCK_M, BLOCK_S], dtype=tl.float32)
        g_r = tl.zeros([BLOCK_M, BLOCK_S], dtype=tl.float32)
        if HAS_DLOSS:
            if MEAN_HEADS:
                diff = tl.load(DIFF + off_b * stride_db + offs_m[:, None] * stride_dm
                               + offs_s[None, :] * stride_ds,
                               mask=m_mask[:, None] & s_mask[None, :], other=0.0)
            else:
                diff = exact_dot(p_t, e_t, SPLIT_DOT) - exact_dot(p_r, e_r, SPLIT_DOT)
            g_t = cw[None, :] * diff
            g_r = -g_t
        if HAS_DMAPS:
            g_t += tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_s[None, :] * stride_gs,
                           mask=m_mask[:, None] & s_mask[None, :], other=0.0).to(tl.float32)
        g_t = g_t * head_share

        # dP_t = scatter(G_t) + dO·Vᵀ; dS_t = P_t ⊙ (dP_t − rowsum(P_t ⊙ dP_t)).
        dp = exact_dot(g_t, tl.trans(e_t), SPLIT_DOT)
        if HAS_DO:
            for d0 in range(0, VALUE_DIM, BLOCK_DV):
                d = d0 + offs_dv
                d_mask = d < VALUE_DIM
                do = tl.load(do_ptr + offs_m[:, None] * stride_dom + d[None, :] * stride_dod,
                             mask=m_mask[:, None] & d_mask[None, :], other=0.0)
                v = tl.load(v_ptr + offs_n[:, None] * stride_vn + d[None, :] * stride_vd,
                            mask=n_mask[:, None] & d_mask[None, :], other=0.0)
                dp = mma(do, tl.trans(v), dp, DOT_PRECISION, DOT_UPCAST)
        ds_t = p_t * (dp - tl.sum(p_t * dp, axis=1)[:, None])
        if REF_GRAD:
            dp_r = exact_dot(g_r * head_share, tl.trans(e_r), SPLIT_DOT)
            ds_r = p_r * (dp_r - tl.sum(p_r * dp_r, axis=1)[:, None])

        # dQ (complete for these rows), dK and dK_ref partials, head dim in chunks.
        for d0 in range(0, HEAD_DIM, BLOCK_D):
            d = d0 + offs_d
            d_mask = d < HEAD_DIM
            k = tl.load(k_ptr + offs_n[:, None] * stride_kn + d[None, :] * stride_kd,
                        mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            dq = mma(ds_t, k, None, DOT_PRECISION, DOT_UPCAST)
            if REF_GRAD:
                kr = tl.load(kr_ptr + offs_nr[:, None] * stride_krn + d[None, :] * stride_krd,
                             mask=nr_mask[:, None] & d_mask[None, :], other=0.0)
                dq = mma(ds_r, kr, dq, DOT_PRECISION, DOT_UPCAST)
            tl.store(dq_ptr + offs_m[:, None] * stride_dqm + d[None, :] * stride_dqd,
                     (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
            q = tl.load(q_ptr + offs_m[:, None] * stride_qm + d[None, :] * stride_qd,
                        mask=m_mask[:, None] & d_mask[None, :], other=0.0)
            dk = mma(tl.trans(ds_t), q, None, DOT_PRECISION, DOT_UPCAST) * sm_scale
            _accumulate(dk_ptr, dk, offs_n, n_mask, d, d_mask, HEAD_DIM, accumulate)
            if REF_GRAD:
                dkr = mma(tl.trans(ds_r), q, None, DOT_PRECISION, DOT_UPCAST) * sm_scale
                _accumulate(dkr_ptr, dkr, offs_nr, nr_mask, d, d_mask, HEAD_DIM, accumulate_r)

        if HAS_DO:  # dV partial += P_tᵀ·dO
            for d0 in range(0, VALUE_DIM, BLOCK_DV):
                d = d0 + offs_dv
                d_mask = d < VALUE_DIM
                do = tl.load(do_ptr + offs_m[:, None] * stride_dom + d[None, :] * stride_dod,
                             mask=m_mask[:, None] & d_mask[None, :], other=0.0)
                dv = mma(tl.trans(p_t), do, None, DOT_PRECISION, DOT_UPCAST)
                _accumulate(dv_ptr, dv, offs_n, n_mask, d, d_mask, VALUE_DIM, accumulate)
        # The next tile reloads these partials, possibly in other threads: order the stores first.
        tl.debug_barrier()


def _strides(t: Optional[torch.Tensor], n: int) -> Tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


def config(q: torch.Tensor, both_key_sets: bool, num_selected: int) -> Tuple[int, int]:
    """(BLOCK_M, num_warps): fixed per shape class (no autotuning, so the order in which a split's
    tiles add into its partials, hence dk/dv's bits, never depends on a tuning run).

    Heavy launches (S > 16 or head dim > 128) take 8 warps, and 16 rows when P_r is recomputed
    too (two P / dS tile pairs); 4 warps / 32 rows otherwise (fp32: 8 warps). The compile check
    (sm_90, fp16) measured spills with 4 warps / 32 rows on those."""
    heavy = num_selected > 16 or q.shape[-1] > 128
    block_m = 16 if (both_key_sets and heavy) else 32
    # 8 warps beyond one token too: sm_80 fp16 D=64 S=16 at 32 rows x 4 warps spilled 24 B.
    eight_warps = both_key_sets or heavy or num_selected > 1 or q.dtype == torch.float32
    return block_m, 8 if eight_warps else 4


def allocate(q, k, v, k_ref, splits, has_do, ref_grad):
    """dq (empty_like q) and the fp32 partials [splits, B, H, rows, dim] (empty when unused)."""
    B, H, _, D = q.shape
    f32 = dict(dtype=torch.float32, device=q.device)
    dk_part = torch.empty(splits, B, H, k.shape[2], D, **f32)
    dv_part = torch.empty(splits, B, H, v.shape[2], v.shape[3], **f32) if has_do else torch.empty(0, **f32)
    dkr_part = torch.empty(splits, B, H, k_ref.shape[2], D, **f32) if ref_grad else torch.empty(0, **f32)
    return torch.empty_like(q), dk_part, dv_part, dkr_part


def launch_args(q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, weights, scale, mean_heads,
                detach_reference, lse, lse_ref, diff, dout, dloss, dmaps, dq, dk_part, dv_part,
                dkr_part, rows_per_split, block_m):
    """(positional args, constexpr kwargs) of one launch (grid ``(splits, B * H)``); also used by
    the compile check with meta tensors."""
    B, H, N, D = q.shape
    M, M_ref, Dv, S = k.shape[2], k_ref.shape[2], v.shape[3], tokens.shape[1]
    has_do, has_dloss, has_dmaps = dout is not None, dloss is not None, dmaps is not None
    ref_grad = (not detach_reference) and has_dloss
    if not has_dmaps:
        g_strides = (0, 0, 0, 0)
    elif mean_heads:
        g_strides = (dmaps.stride(0), 0, dmaps.stride(1), dmaps.stride(2))
    else:
        g_strides = tuple(dmaps.stride())
    keep_ref = lse_ref.numel() > 0
    args = (
        q, k, v, k_ref, bias if bias is not None else lse, ref_bias if ref_bias is not None else lse,
        tokens, ref_tokens, weights if weights is not None else lse, lse,
        lse_ref if keep_ref else lse, diff if mean_heads else lse, dout if has_do else q,
        dloss if has_dloss else lse, dmaps if has_dmaps else lse, dq, dk_part,
        dv_part if has_do else dk_part, dkr_part if ref_grad else dk_part,
        *q.stride(), *k.stride(), *v.stride(), *k_ref.stride(), *_strides(bias, 3),
        *_strides(ref_bias, 3), *tokens.stride(), *ref_tokens.stride(), *_strides(weights, 2),
        *lse.stride(), *(diff.stride() if mean_heads else (0, 0, 0)), *_strides(dout, 4),
        dloss.stride(0) if has_dloss else 0, *g_strides, *dq.stride(),
        H, N, M, M_ref, S, rows_per_split,
        float(scale), 2.0 / (N * (1 if mean_heads else H)),
    )
    max_block_d = max_head_dim_block(q.dtype, backward=True)
    constexprs = dict(
        HEAD_DIM=D, VALUE_DIM=Dv, BLOCK_M=block_m, BLOCK_N=key_block(M), BLOCK_NR=key_block(M_ref),
        BLOCK_D=head_dim_block(D, max_block_d), BLOCK_DV=head_dim_block(Dv, max_block_d),
        BLOCK_S=select_block(S), MEAN_HEADS=bool(mean_heads), REF_GRAD=ref_grad,
        HAS_BIAS=bias is not None, HAS_RBIAS=ref_bias is not None, HAS_W=weights is not None,
        HAS_DO=has_do, HAS_DLOSS=has_dloss, HAS_DMAPS=has_dmaps,
        NEED_PR=ref_grad or (has_dloss and not mean_heads),
        ALIGNED=aligned8(q, k, v, k_ref, dq, dout), SPLIT_DOT=not interpreting(),
        DOT_PRECISION=dot_precision(q.dtype), DOT_UPCAST=dot_upcast(q.dtype),
    )
    return args, constexprs


def subject_bwd(q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, weights, scale, mean_heads,
                detach_reference, out, lse, lse_ref, diff, dout, dloss, dmaps):
    """(dq, dk, dv, dk_ref) of the subject op (CONTRACT.md): each gradient has its input's strides
    and dtype; dk_ref is empty when the reference is detached. ``out`` is not read (the softmax
    backward's row term is rowsum(P ⊙ dP), computed in fp32 from the recomputed P).

    Launches: the kernel, then one fixed-order reduction per key-sized gradient (dk, dv, dk_ref)."""
    B, H, N, _ = q.shape
    ref_grad = (not detach_reference) and dloss is not None
    dk_ref = q.new_empty(0) if detach_reference else torch.empty_like(k_ref)
    if N == 0 or H == 0 or (dout is None and dloss is None and dmaps is None):
        dk_ref = dk_ref.zero_()
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dk_ref
    block_m, warps = config(q, ref_grad or (dloss is not None and not mean_heads), tokens.shape[1])
    splits, rows_per_split = backward_splits(N, B * H)
    dq, dk_part, dv_part, dkr_part = allocate(q, k, v, k_ref, splits, dout is not None, ref_grad)
    args, constexprs = launch_args(q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, weights,
                                   scale, mean_heads, detach_reference, lse, lse_ref, diff, dout,
                                   dloss, dmaps, dq, dk_part, dv_part, dkr_part, rows_per_split,
                                   block_m)
    with device_guard(q):
        _subject_bwd_kernel[(splits, B * H)](*args, **constexprs, num_warps=warps, num_stages=1)
        dk = sum_splits_into(dk_part, torch.empty_like(k))
        dv = sum_splits_into(dv_part, torch.empty_like(v)) if dout is not None else torch.zeros_like(v)
        if ref_grad:
            dk_ref = sum_splits_into(dkr_part, dk_ref)
        elif not detach_reference:
            dk_ref.zero_()  # no loss gradient: nothing flows into the reference keys
    return dq, dk, dv, dk_ref
