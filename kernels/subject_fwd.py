"""Forward of the one-pass subject-wise attention loss (SeFi-IDE), ``subject_fwd``.

Each program loads a query tile once per head and computes, against the target keys ``k`` and the
reference keys ``k_ref`` in the same head-dim loop, both full-row softmaxes (all keys of a head fit
one block): out and lse from the target, A_t / A_r by a one-hot product, the head mean and the
weighted squared difference; the loss comes out as one partial per program, summed in a fixed
order by one small reduction. No [B, H, N, M] tensor reaches global memory.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import aligned8, aligned_strides, device_guard, exact_dot, fill_block_m, one_hot, row_softmax, select_block
from ._utils import dot_precision, dot_upcast, head_dim_block, interpreting, key_block, max_head_dim_block, mma


@triton.jit
def _logits(s, q, k_ptr, stride_kn, stride_kd, d, offs_n, n_mask, d_mask,
            DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """s + q · k[:, d]ᵀ for one head-dim chunk ``d`` (keys past ``n_mask`` load 0)."""
    k = tl.load(k_ptr + offs_n[:, None] * stride_kn + d[None, :] * stride_kd,
                mask=n_mask[:, None] & d_mask[None, :], other=0.0)
    return mma(q, tl.trans(k), s, DOT_PRECISION, DOT_UPCAST)


@triton.jit
def _masked(s, bias_ptr, stride_bn, offs_n, n_mask, sm_scale, HAS_BIAS: tl.constexpr):
    """Logits scaled, plus the key bias, -inf on keys past the end."""
    s = s * sm_scale
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bn, mask=n_mask, other=0.0)
        s = s + bias.to(tl.float32)[None, :]
    return tl.where(n_mask[None, :], s, float("-inf"))


@triton.jit
def _subject_fwd_kernel(
    Q, K, V, KR, BIAS, RBIAS, TOK, RTOK, W, O, LSE, LSER, MAPS, DIFF, LOSS_PART,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_krb, stride_krh, stride_krn, stride_krd,
    stride_biasb, stride_biash, stride_biasn,
    stride_rbiasb, stride_rbiash, stride_rbiasn,
    stride_tokb, stride_toks, stride_rtokb, stride_rtoks, stride_wb, stride_ws,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lseb, stride_lseh, stride_lsem,
    stride_ab, stride_ah, stride_am, stride_as,
    stride_db, stride_dm, stride_ds,
    H, N_Q, N_KV, N_REF, NUM_SEL,
    sm_scale, loss_scale,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_NR: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
    MEAN_HEADS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RBIAS: tl.constexpr, HAS_W: tl.constexpr,
    WRITE_LSER: tl.constexpr, RETURN_MAPS: tl.constexpr, ALIGNED: tl.constexpr,
    SPLIT_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """Out, lse (lse_ref), A_t / A_r, their difference and one loss partial per program.

    Formula, per head h, row m (P_t from k and bias, P_r from k_ref and ref_bias, as in xattn)::

        O[m]      = Σ_n P_t[m, n] v[n]                  LSE[m] = ln Σ_n exp(s_t[m, n])
        A_t[m, j] = P_t[m, TOK[j]]                      A_r[m, j] = P_r[m, RTOK[j]]
        d         = A_t − A_r,  or  (1/H) Σ_h (A_t − A_r)  with MEAN_HEADS
        LOSS_PART = loss_scale · Σ_{m, j} w[j] · d[m, j]²    (w = W[b] or 1 / NUM_SEL)

    ``loss_scale`` = 1 / (N · (1 if MEAN_HEADS else H)): the partials sum to loss[b].

    Grid: ``(cdiv(N_Q, BLOCK_M), B)`` with MEAN_HEADS (one program loops over the H heads of its
    rows and sums P_t, P_r in registers; the head mean needs all heads before d is squared, and
    the gather, being linear, runs once on the sums), else
    ``(cdiv(N_Q, BLOCK_M), B * H)``. Partial ``LOSS_PART[pid_1, pid_0]`` (contiguous).

    Invariants: all keys of a head in one block (BLOCK_N >= N_KV, BLOCK_NR >= N_REF); head dims
    in masked BLOCK_D chunks; rows >= N_Q contribute 0; padding columns of ragged rows carry
    weight 0 (and are still written to MAPS / DIFF). fp32 accumulation; int64 batch/head offsets.
    """
    tl.static_assert(BLOCK_N >= 16)
    tl.static_assert(BLOCK_S >= 16)
    stride_qb, stride_qh, stride_qm = aligned_strides(stride_qb, stride_qh, stride_qm, ALIGNED)
    stride_kb, stride_kh, stride_kn = aligned_strides(stride_kb, stride_kh, stride_kn, ALIGNED)
    stride_vb, stride_vh, stride_vn = aligned_strides(stride_vb, stride_vh, stride_vn, ALIGNED)
    stride_krb, stride_krh, stride_krn = aligned_strides(stride_krb, stride_krh, stride_krn, ALIGNED)
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
    offs_nr = tl.arange(0, BLOCK_NR)
    offs_d = tl.arange(0, BLOCK_D)
    offs_s = tl.arange(0, BLOCK_S)
    m_mask = offs_m < N_Q
    n_mask = offs_n < N_KV
    nr_mask = offs_nr < N_REF
    s_mask = offs_s < NUM_SEL
    # Token indices and loss weights of this batch row as vectors (no scalar loads).
    tok = tl.load(TOK + off_b * stride_tokb + offs_s * stride_toks, mask=s_mask, other=0)
    rtok = tl.load(RTOK + off_b * stride_rtokb + offs_s * stride_rtoks, mask=s_mask, other=0)
    if HAS_W:
        w = tl.load(W + off_b * stride_wb + offs_s * stride_ws, mask=s_mask, other=0.0).to(tl.float32)
    else:
        w = tl.where(s_mask, 1.0 / NUM_SEL, 0.0)

    psum_t = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    psum_r = tl.zeros([BLOCK_M, BLOCK_NR], dtype=tl.float32)
    loss_rows = tl.zeros([BLOCK_M], dtype=tl.float32)
    for h in range(h_start, h_end):
        off_h = tl.cast(h, tl.int64)
        q_ptr = Q + off_b * stride_qb + off_h * stride_qh
        k_ptr = K + off_b * stride_kb + off_h * stride_kh
        kr_ptr = KR + off_b * stride_krb + off_h * stride_krh

        # Both logit tiles in one head-dim loop: each q chunk is loaded once.
        s_t = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        s_r = tl.zeros([BLOCK_M, BLOCK_NR], dtype=tl.float32)
        for d0 in range(0, HEAD_DIM, BLOCK_D):
            d = d0 + offs_d
            d_mask = d < HEAD_DIM
            q = tl.load(q_ptr + offs_m[:, None] * stride_qm + d[None, :] * stride_qd,
                        mask=m_mask[:, None] & d_mask[None, :], other=0.0)
            s_t = _logits(s_t, q, k_ptr, stride_kn, stride_kd, d, offs_n, n_mask, d_mask,
                          DOT_PRECISION, DOT_UPCAST)
            s_r = _logits(s_r, q, kr_ptr, stride_krn, stride_krd, d, offs_nr, nr_mask, d_mask,
                          DOT_PRECISION, DOT_UPCAST)
        s_t = _masked(s_t, BIAS + off_b * stride_biasb + off_h * stride_biash, stride_biasn,
                      offs_n, n_mask, sm_scale, HAS_BIAS)
        s_r = _masked(s_r, RBIAS + off_b * stride_rbiasb + off_h * stride_rbiash, stride_rbiasn,
                      offs_nr, nr_mask, sm_scale, HAS_RBIAS)

        # Reference first: its tile is dead before the target's value loop starts.
        p_r, lse_r = row_softmax(s_r)
        lse_off = off_b * stride_lseb + off_h * stride_lseh + offs_m * stride_lsem
        if WRITE_LSER:
            tl.store(LSER + lse_off, lse_r, mask=m_mask)
        p_t, lse_t = row_softmax(s_t)
        tl.store(LSE + lse_off, lse_t, mask=m_mask)
        if MEAN_HEADS:
            # The gather is linear: sum P over heads, gather once after the loop (no one-hot
            # matrix or map tile lives across the head loop).
            psum_t += p_t
            psum_r += p_r
        else:
            a_r = exact_dot(p_r, one_hot(rtok, s_mask, offs_nr, True), SPLIT_DOT)
            a_t = exact_dot(p_t, one_hot(tok, s_mask, offs_n, True), SPLIT_DOT)
            d_h = tl.where(m_mask[:, None], a_t - a_r, 0.0)
            loss_rows += tl.sum(w[None, :] * d_h * d_h, axis=1)
            if RETURN_MAPS:
                tl.store(MAPS + off_b * stride_ab + off_h * stride_ah
                         + offs_m[:, None] * stride_am + offs_s[None, :] * stride_as,
                         a_t, mask=m_mask[:, None] & s_mask[None, :])

        # out = P_t v; P_t's tensor-core operand is the input dtype (fp32 under the bf16 upcast).
        if not DOT_UPCAST:
            p_t = p_t.to(V.dtype.element_ty)
        v_ptr = V + off_b * stride_vb + off_h * stride_vh
        o_ptr = O + off_b * stride_ob + off_h * stride_oh
        for d0 in range(0, VALUE_DIM, BLOCK_DV):
            d = d0 + tl.arange(0, BLOCK_DV)
            d_mask = d < VALUE_DIM
            v = tl.load(v_ptr + offs_n[:, None] * stride_vn + d[None, :] * stride_vd,
                        mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            o = mma(p_t, v, None, DOT_PRECISION, DOT_UPCAST)
            tl.store(o_ptr + offs_m[:, None] * stride_om + d[None, :] * stride_od,
                     o.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])

    if MEAN_HEADS:
        a_t = exact_dot(psum_t, one_hot(tok, s_mask, offs_n, True), SPLIT_DOT) / H
        a_r = exact_dot(psum_r, one_hot(rtok, s_mask, offs_nr, True), SPLIT_DOT) / H
        dm = tl.where(m_mask[:, None], a_t - a_r, 0.0)
        tile_mask = m_mask[:, None] & s_mask[None, :]
        tl.store(DIFF + off_b * stride_db + offs_m[:, None] * stride_dm + offs_s[None, :] * stride_ds,
                 dm, mask=tile_mask)
        if RETURN_MAPS:
            tl.store(MAPS + off_b * stride_ab + offs_m[:, None] * stride_am + offs_s[None, :] * stride_as,
                     a_t, mask=tile_mask)
        loss_rows = tl.sum(w[None, :] * dm * dm, axis=1)
    partial = tl.sum(loss_rows, axis=0) * loss_scale
    tl.store(LOSS_PART + pid_bh * tl.num_programs(0) + pid_m, partial)


def _strides(t: Optional[torch.Tensor], n: int) -> Tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


def config(q: torch.Tensor, mean_heads: bool, num_selected: int) -> Tuple[int, int]:
    """(BLOCK_M, num_warps): a fixed tile per shape class (no autotuning: the loss partials, one
    per program, must not change with a tuning choice). Head-mean grids (B programs per row block)
    take the largest tile that still reaches 132 programs; fp32 (FMA dots) and S > 32 stay at
    <= 32 rows, head means at head dim > 128 at 16. 8 warps for head means (two [BLOCK_M, BLOCK_N] sums live across the head loop),
    S > 16 and 64-row tiles: with 4 warps the compile check measured spills there (sm_90)."""
    B, H, N, _ = q.shape
    largest = 32 if (q.dtype == torch.float32 or num_selected > 32) else 64
    if mean_heads and q.shape[-1] > 128:
        largest = 16
    block_m = fill_block_m(N, B if mean_heads else B * H, largest)
    return block_m, 8 if (mean_heads or block_m > 32 or num_selected > 16) else 4


def grid(q: torch.Tensor, mean_heads: bool, block_m: int) -> Tuple[int, int]:
    B, H, N, _ = q.shape
    return (triton.cdiv(N, block_m), B if mean_heads else B * H)


def allocate(q, v, tokens, mean_heads, detach_reference, return_maps, block_m):
    """(out, lse, lse_ref, maps, diff, loss_part) in the contract's layouts (CONTRACT.md)."""
    B, H, N, _ = q.shape
    S = tokens.shape[1]
    f32 = dict(dtype=torch.float32, device=q.device)
    out = torch.empty(B, N, H, v.shape[3], dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(B, H, N, **f32)
    lse_ref = torch.empty(B, H, N, **f32) if not (mean_heads and detach_reference) else torch.empty(0, **f32)
    map_shape = (B, N, S) if mean_heads else (B, H, N, S)
    maps = torch.empty(map_shape, **f32) if return_maps else torch.empty(0, **f32)
    diff = torch.empty(B, N, S, **f32) if mean_heads else torch.empty(0, **f32)
    gx, gy = grid(q, mean_heads, block_m)
    loss_part = torch.empty(gy, gx, **f32)
    return out, lse, lse_ref, maps, diff, loss_part


def launch_args(q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, weights, scale, mean_heads,
                detach_reference, return_maps, out, lse, lse_ref, maps, diff, loss_part, block_m):
    """(positional args, constexpr kwargs) of one launch; the compile check calls it with meta
    tensors so that it compiles exactly what a launch runs."""
    B, H, N, D = q.shape
    M, M_ref, Dv, S = k.shape[2], k_ref.shape[2], v.shape[3], tokens.shape[1]
    write_lser = lse_ref.numel() > 0
    if not return_maps:
        map_strides = (0, 0, 0, 0)
    elif mean_heads:
        map_strides = (maps.stride(0), 0, maps.stride(1), maps.stride(2))
    else:
        map_strides = tuple(maps.stride())
    # Absent tensors are replaced by a present one: their flag keeps them unread/unwritten.
    args = (
        q, k, v, k_ref, bias if bias is not None else lse, ref_bias if ref_bias is not None else lse,
        tokens, ref_tokens, weights if weights is not None else lse, out, lse,
        lse_ref if write_lser else lse, maps if return_maps else lse, diff if mean_heads else lse,
        loss_part,
        *q.stride(), *k.stride(), *v.stride(), *k_ref.stride(), *_strides(bias, 3),
        *_strides(ref_bias, 3), *tokens.stride(), *ref_tokens.stride(), *_strides(weights, 2),
        *out.stride(), *lse.stride(), *map_strides,
        *(diff.stride() if mean_heads else (0, 0, 0)),
        H, N, M, M_ref, S,
        float(scale), 1.0 / (N * (1 if mean_heads else H)),
    )
    max_block_d = max_head_dim_block(q.dtype, backward=False)
    constexprs = dict(
        HEAD_DIM=D, VALUE_DIM=Dv, BLOCK_M=block_m, BLOCK_N=key_block(M), BLOCK_NR=key_block(M_ref),
        BLOCK_D=head_dim_block(D, max_block_d), BLOCK_DV=head_dim_block(Dv, max_block_d),
        BLOCK_S=select_block(S), MEAN_HEADS=bool(mean_heads), HAS_BIAS=bias is not None,
        HAS_RBIAS=ref_bias is not None, HAS_W=weights is not None, WRITE_LSER=write_lser,
        # 16-row tiles keep 2-byte loads: there the vector loads' registers made ptxas spill at
        # head dim 40 on sm_90 (8 B, compile check); no SD shape at head dim 40 runs 16 rows.
        RETURN_MAPS=bool(return_maps), ALIGNED=block_m > 16 and aligned8(q, k, v, k_ref, out),
        SPLIT_DOT=not interpreting(), DOT_PRECISION=dot_precision(q.dtype),
        DOT_UPCAST=dot_upcast(q.dtype),
    )
    return args, constexprs


def subject_fwd(q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, weights, scale, mean_heads,
                detach_reference, return_maps):
    """(out, lse, lse_ref, loss, maps, diff) of the subject op; shapes and layouts in CONTRACT.md.

    q [B, H, N, D], k/v [B, H, M, D/Dv], k_ref [B, H, M_ref, D] with any strides, fp16/bf16/fp32;
    bias / ref_bias [B, H, M] / [B, H, M_ref] fp32 or None; tokens / ref_tokens [B, S] int64;
    weights [B, S] fp32 or None (1/S). Two launches: the kernel and the fixed-order loss sum.
    """
    block_m, warps = config(q, mean_heads, tokens.shape[1])
    out, lse, lse_ref, maps, diff, loss_part = allocate(q, v, tokens, mean_heads, detach_reference,
                                                        return_maps, block_m)
    B, H, N, _ = q.shape
    if N == 0 or H == 0:
        return out, lse, lse_ref, torch.zeros(B, dtype=torch.float32, device=q.device), maps, diff
    args, constexprs = launch_args(q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, weights,
                                   scale, mean_heads, detach_reference, return_maps, out, lse,
                                   lse_ref, maps, diff, loss_part, block_m)
    with device_guard(q):
        _subject_fwd_kernel[grid(q, mean_heads, block_m)](*args, **constexprs, num_warps=warps,
                                                           num_stages=1)
        # loss[b]: the partials of row b ([B, H * blocks] or [B, blocks]) summed in a fixed order.
        loss = loss_part.view(B, -1).sum(dim=1)
    return out, lse, lse_ref, loss, maps, diff

