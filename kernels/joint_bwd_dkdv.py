"""Key pass of the key-blocked backward: dk, dv (and dk_ref) per key block, queries walked."""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import LOG2E
from ._joint import any_token_in, ref_token_positions, scatter_columns
from ._utils import mma


@triton.jit
def _joint_bwd_dkdv_kernel(
    Q, K, V, BIAS, TOK, RTOK, LSE, DELTA, LSER, DELTAR, DO, GT, GR, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_biasb, stride_biash, stride_biasn,
    stride_tokb, stride_toks, stride_rtokb, stride_rtoks,
    stride_lseb, stride_lseh, stride_lsem,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_gb, stride_gh, stride_gm, stride_gs,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, N_KEYS, CLS_START, CLS_STOP, N_REF, NUM_SEL, MAP_START, MAP_STOP, SEG_START, SEG_STOP,
    ROW_START, ROW_STOP, sm_scale,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_SC: tl.constexpr,
    HAS_DO: tl.constexpr, HAS_G: tl.constexpr, REF_GRAD: tl.constexpr, IS_REF: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """dK (and dV) of one block of keys of one head, over the query rows [ROW_START, ROW_STOP).

    Formula (as the dq pass; P, dS recomputed per query tile from LSE / DELTA / GT)::

        dV = Σ_m P[m]ᵀ dO[m]         dK = Σ_m (dS_t + dS_r)[m]ᵀ q[m] · scale

    Target launch (IS_REF False): K, V are the target keys; TOK the target tokens; with REF_GRAD
    the keys outside [CLS_START, CLS_STOP) (the reference segment) add the reference's dS_r
    (LSER, DELTAR, GR, its tokens landing on them). Reference launch (IS_REF): K is k_ref, BIAS
    the reference bias, LSE / DELTA / GT the reference's, the tokens those landing in k_ref, the
    rows the map rows (elsewhere P_r = 0). Grid ``(blocks, B * H)``: the key blocks of
    [0, CLS_START), [CLS_START, CLS_STOP), [CLS_STOP, N_KEYS) in that order, each block inside
    one range. Each program owns its dK / dV rows: deterministic, no partials.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = tl.cast(pid_bh // H, tl.int64)
    off_h = tl.cast(pid_bh % H, tl.int64)
    nb_left = tl.cdiv(CLS_START, BLOCK_N)
    nb_mid = tl.cdiv(CLS_STOP - CLS_START, BLOCK_N)
    in_left = pid_n < nb_left
    in_mid = (pid_n >= nb_left) & (pid_n < nb_left + nb_mid)
    start_n = tl.where(in_left, pid_n * BLOCK_N,
                       tl.where(in_mid, CLS_START + (pid_n - nb_left) * BLOCK_N,
                                CLS_STOP + (pid_n - nb_left - nb_mid) * BLOCK_N))
    hi = tl.where(in_left, CLS_START, tl.where(in_mid, CLS_STOP, N_KEYS))
    outside = in_mid == 0

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_s = tl.arange(0, BLOCK_S)
    n_mask = offs_n < hi
    d_mask = offs_d < HEAD_DIM
    dv_mask = offs_dv < VALUE_DIM
    s_mask = offs_s < NUM_SEL
    # The key (and value) block and its bias stay in registers for the whole query walk.
    k = tl.load(K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
    bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS + off_b * stride_biasb + off_h * stride_biash + offs_n * stride_biasn,
                       mask=n_mask, other=0.0).to(tl.float32)
    bias = tl.where(n_mask, bias, float("-inf"))
    v = tl.zeros([BLOCK_N, BLOCK_DV], dtype=K.dtype.element_ty)
    if HAS_DO:
        v = tl.load(V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vn
                    + offs_dv[None, :] * stride_vd, mask=n_mask[:, None] & dv_mask[None, :], other=0.0)
    tok = tl.full([BLOCK_S], -1, tl.int32)
    rt_k = tl.full([BLOCK_S], -1, tl.int32)
    if IS_REF or REF_GRAD:
        rtok = tl.load(RTOK + off_b * stride_rtokb + offs_s * stride_rtoks, mask=s_mask, other=-1).to(tl.int32)
        rt_k, rt_r = ref_token_positions(rtok, s_mask, SEG_START, SEG_STOP, N_REF)
    if IS_REF:
        tok = rt_r
    elif HAS_G:
        tok = tl.load(TOK + off_b * stride_tokb + offs_s * stride_toks, mask=s_mask, other=-1).to(tl.int32)
    blk_hit = any_token_in(tok, s_mask, start_n, start_n + BLOCK_N)
    gt_ptr = GT + off_b * stride_gb + off_h * stride_gh
    gr_ptr = GR + off_b * stride_gb + off_h * stride_gh
    rtok_ptr = RTOK + off_b * stride_rtokb
    if IS_REF:  # chunks of the scatter read the reference tokens (KIND 2 maps them to k_ref rows)
        tok_ptr = rtok_ptr
        stride_tok = stride_rtoks
    else:
        tok_ptr = TOK + off_b * stride_tokb
        stride_tok = stride_toks
    ref_hit = any_token_in(rt_k, s_mask, start_n, start_n + BLOCK_N)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for start_m in range(ROW_START, ROW_STOP, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < ROW_STOP
        rows_hit = (start_m < MAP_STOP) & (start_m + BLOCK_M > MAP_START)
        q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm
                    + offs_d[None, :] * stride_qd, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        s = mma(q, tl.trans(k), None, DOT_PRECISION, DOT_UPCAST) * sm_scale + bias[None, :]
        lse_off = off_b * stride_lseb + off_h * stride_lseh + offs_m * stride_lsem
        lse = tl.load(LSE + lse_off, mask=m_mask, other=float("inf"))
        p = tl.math.exp2((s - lse[:, None]) * LOG2E)
        dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if HAS_DO:
            do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom
                         + offs_dv[None, :] * stride_dod, mask=m_mask[:, None] & dv_mask[None, :], other=0.0)
            dp = mma(do, tl.trans(v), dp, DOT_PRECISION, DOT_UPCAST)
            dv = mma(tl.trans(p), do, dv, DOT_PRECISION, DOT_UPCAST)
        in_map = m_mask & (offs_m >= MAP_START) & (offs_m < MAP_STOP)
        if HAS_G:
            dp = scatter_columns(dp, gt_ptr, offs_m - MAP_START, in_map, stride_gm, stride_gs, tok_ptr,
                                 stride_tok, NUM_SEL, offs_n, blk_hit & rows_hit, SEG_START, SEG_STOP, N_REF,
                                 2 if IS_REF else 0, BLOCK_SC, SPLIT_DOT)
        ds = p * (dp - tl.load(DELTA + lse_off, mask=m_mask, other=0.0)[:, None])
        if REF_GRAD and not IS_REF:
            if outside & rows_hit:  # outside keys also serve the reference (split lse)
                lse_r = tl.load(LSER + lse_off, mask=m_mask, other=float("inf"))
                p_r = tl.math.exp2((s - lse_r[:, None]) * LOG2E)
                dp_r = scatter_columns(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), gr_ptr, offs_m - MAP_START,
                                       in_map, stride_gm, stride_gs, rtok_ptr, stride_rtoks, NUM_SEL, offs_n,
                                       ref_hit, SEG_START, SEG_STOP, N_REF, 1, BLOCK_SC, SPLIT_DOT)
                ds += p_r * (dp_r - tl.load(DELTAR + lse_off, mask=m_mask, other=0.0)[:, None])
        dk = mma(tl.trans(ds), q, dk, DOT_PRECISION, DOT_UPCAST)

    tl.store(DK + off_b * stride_dkb + off_h * stride_dkh + offs_n[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, (dk * sm_scale).to(DK.dtype.element_ty),
             mask=n_mask[:, None] & d_mask[None, :])
    if HAS_DO:
        tl.store(DV + off_b * stride_dvb + off_h * stride_dvh + offs_n[:, None] * stride_dvn
                 + offs_dv[None, :] * stride_dvd, dv.to(DV.dtype.element_ty),
                 mask=n_mask[:, None] & dv_mask[None, :])
