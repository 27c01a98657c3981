"""First pass of the key-blocked backward: per-row softmax-backward terms and map gradients.

For every query row: ``delta = rowsum(dO ⊙ O) + Σ_j A_t[j]·G_t[j]`` (= rowsum(P ⊙ dP), dP holding
the scattered map gradient), the reference's ``delta_r = Σ_j A_r[j]·G_r[j]``, and the map
gradients G_t / G_r per head of the map rows. A_t and A_r are recomputed from the gathered
selected keys and the saved lse (a [BLOCK_M, BLOCK_S] product; no key walk), so the forward keeps
no per-head maps. The key passes (:mod:`.joint_bwd`) then read these per-row values.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import LOG2E
from ._joint import gather_logits, ref_token_positions


@triton.jit
def _joint_bwd_prep_kernel(
    Q, K, KR, BIAS, RBIAS, TOK, RTOK, W, LSE, LSER, O, DO, DIFF, DLOSS, DMAPS, DELTA, DELTAR, GT, GR,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_krb, stride_krh, stride_krn, stride_krd,
    stride_biasb, stride_biash, stride_biasn,
    stride_rbiasb, stride_rbiash, stride_rbiasn,
    stride_tokb, stride_toks, stride_rtokb, stride_rtoks, stride_wb, stride_ws,
    stride_lseb, stride_lseh, stride_lsem,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_diffb, stride_diffm, stride_diffs, stride_dlb,
    stride_gmb, stride_gmh, stride_gmm, stride_gms,
    stride_gb, stride_gh, stride_gm, stride_gs,
    H, N_Q, N_KV, N_REF, NUM_SEL, MAP_START, MAP_STOP, SEG_START, SEG_STOP,
    sm_scale, grad_scale, head_share,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_DO: tl.constexpr, HAS_DMAPS: tl.constexpr, HAS_DLOSS: tl.constexpr, HAS_REF: tl.constexpr,
    MEAN_DIFF: tl.constexpr, REF_GRAD: tl.constexpr, NEED_AR: tl.constexpr, HAS_W: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RBIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """Per-row backward terms of one BLOCK_M tile of one head.

    Formula (A = exp(gathered logit − lse); c = grad_scale · DLOSS[b]; w = W[b] or 1 / NUM_SEL;
    d = DIFF (the saved head-mean difference, MEAN_DIFF) or A_t − A_r of this head)::

        G_t = head_share · (c·w·d + DMAPS)      G_r = −head_share · c·w·d      (map rows only)
        DELTA[m]  = Σ_d dO[m, d]·O[m, d] + Σ_j A_t[m, j]·G_t[m, j]
        DELTAR[m] = Σ_j A_r[m, j]·G_r[m, j]     (REF_GRAD; 0 outside the map rows)

    A_r is recomputed when NEED_AR (the reference's gradient, or per-head maps with a loss).
    ``head_share`` is 1/H for head-mean maps. Grid ``(cdiv(N_Q, BLOCK_M), B * H)``; GT / GR
    [B, H, N_map, S] fp32 are written for the map rows, BLOCK_S columns at a time. Every load and
    store is masked.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = tl.cast(pid_bh // H, tl.int64)
    off_h = tl.cast(pid_bh % H, tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < N_Q
    d_mask = offs_d < HEAD_DIM
    in_map = m_mask & (offs_m >= MAP_START) & (offs_m < MAP_STOP)
    lse_off = off_b * stride_lseb + off_h * stride_lseh + offs_m * stride_lsem

    delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_DO:
        offs_dv = tl.arange(0, BLOCK_DV)
        dv_mask = m_mask[:, None] & (offs_dv < VALUE_DIM)[None, :]
        o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om
                    + offs_dv[None, :] * stride_od, mask=dv_mask, other=0.0).to(tl.float32)
        do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom
                     + offs_dv[None, :] * stride_dod, mask=dv_mask, other=0.0).to(tl.float32)
        delta = tl.sum(o * do, axis=1)

    if HAS_DMAPS or HAS_DLOSS:
        q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm
                    + offs_d[None, :] * stride_qd, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        k_ptr = K + off_b * stride_kb + off_h * stride_kh
        bias_ptr = BIAS + off_b * stride_biasb + off_h * stride_biash
        lse = tl.load(LSE + lse_off, mask=in_map, other=float("inf"))
        lse_r = tl.full([BLOCK_M], float("inf"), tl.float32)
        if NEED_AR:
            lse_r = tl.load(LSER + lse_off, mask=in_map, other=float("inf"))
        delta_r = tl.zeros([BLOCK_M], dtype=tl.float32)
        # The selected columns in chunks of BLOCK_S (16, the launcher's): no [BLOCK_M, S] tile of
        # all S = 77 columns and their gathered [S, BLOCK_D] key rows is live at once (32-column
        # chunks still spilled 136-160 B at head dim 72 with the reference, sm_80 / sm_90).
        for s0 in range(0, NUM_SEL, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            s_mask = offs_s < NUM_SEL
            map_mask = in_map[:, None] & s_mask[None, :]
            tok = tl.load(TOK + off_b * stride_tokb + offs_s * stride_toks, mask=s_mask, other=0).to(tl.int64)
            s_t = gather_logits(q, k_ptr, stride_kn, stride_kd, bias_ptr, stride_biasn, tok, s_mask,
                                offs_d, d_mask, sm_scale, HAS_BIAS, DOT_PRECISION, DOT_UPCAST)
            a_t = tl.where(map_mask, tl.math.exp2((s_t - lse[:, None]) * LOG2E), 0.0)
            if NEED_AR:
                rtok = tl.load(RTOK + off_b * stride_rtokb + offs_s * stride_rtoks, mask=s_mask,
                               other=-1).to(tl.int64)
                rt_k, rt_r = ref_token_positions(rtok, s_mask, SEG_START, SEG_STOP, N_REF)
                s_rk = gather_logits(q, k_ptr, stride_kn, stride_kd, bias_ptr, stride_biasn, rt_k, rt_k >= 0,
                                     offs_d, d_mask, sm_scale, HAS_BIAS, DOT_PRECISION, DOT_UPCAST)
                s_rr = gather_logits(q, KR + off_b * stride_krb + off_h * stride_krh, stride_krn, stride_krd,
                                     RBIAS + off_b * stride_rbiasb + off_h * stride_rbiash, stride_rbiasn,
                                     rt_r, rt_r >= 0, offs_d, d_mask, sm_scale, HAS_RBIAS, DOT_PRECISION,
                                     DOT_UPCAST)
                s_r = tl.where((rt_r >= 0)[None, :], s_rr, s_rk)
                a_r = tl.where(map_mask, tl.math.exp2((s_r - lse_r[:, None]) * LOG2E), 0.0)
            g_t = tl.zeros([BLOCK_M, BLOCK_S], dtype=tl.float32)
            g_r = tl.zeros([BLOCK_M, BLOCK_S], dtype=tl.float32)
            if HAS_DLOSS:
                # c·w per column as a vector (DLOSS[b] loaded into every lane: no scalar load).
                cw = tl.load(DLOSS + off_b * stride_dlb + offs_s * 0).to(tl.float32) * grad_scale
                if HAS_W:
                    cw = cw * tl.load(W + off_b * stride_wb + offs_s * stride_ws, mask=s_mask,
                                      other=0.0).to(tl.float32)
                else:
                    cw = cw / NUM_SEL
                cw = tl.where(s_mask, cw, 0.0)
                if MEAN_DIFF:
                    d = tl.load(DIFF + off_b * stride_diffb + (offs_m - MAP_START)[:, None] * stride_diffm
                                + offs_s[None, :] * stride_diffs, mask=map_mask, other=0.0)
                else:
                    d = a_t - a_r
                g_t = cw[None, :] * d
                g_r = -g_t
            if HAS_DMAPS:
                g_t += tl.load(DMAPS + off_b * stride_gmb + off_h * stride_gmh + (offs_m - MAP_START)[:, None]
                               * stride_gmm + offs_s[None, :] * stride_gms, mask=map_mask,
                               other=0.0).to(tl.float32)
            g_t = g_t * head_share
            g_off = (off_b * stride_gb + off_h * stride_gh + (offs_m - MAP_START)[:, None] * stride_gm
                     + offs_s[None, :] * stride_gs)
            tl.store(GT + g_off, g_t, mask=map_mask)
            delta += tl.sum(a_t * g_t, axis=1)
            if REF_GRAD:
                g_r = g_r * head_share
                tl.store(GR + g_off, g_r, mask=map_mask)
                delta_r += tl.sum(a_r * g_r, axis=1)
        if REF_GRAD:
            tl.store(DELTAR + lse_off, delta_r, mask=m_mask)
    tl.store(DELTA + lse_off, delta, mask=m_mask)
