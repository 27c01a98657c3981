"""Device functions and tile policy of the key-blocked (joint key set) kernels.

Imports only torch and triton (this folder is installed as ``semfid.kernels``).

The key-blocked kernels (:mod:`.joint_fwd`, :mod:`.joint_bwd`) walk the keys in blocks of
BLOCK_N with the online softmax, as flash attention does, so any number of keys M works (the
joint [image, text] key sets of SD3 / Flux: 4608 keys). Selected key columns (the map tokens)
are carried as extra value columns: each key block that holds a selected token adds
``P_block @ E`` (E its one-hot matrix) to a [BLOCK_M, BLOCK_S] accumulator, rescaled like the
output, and normalised by the final row sum. The subject op's reference sequence
``cat(k[:seg_start], k_ref, k[seg_stop:])`` is never built: the keys outside the segment are read
once, and their statistics (max, sum, reference-token columns) serve the target and the reference
(the split log-sum-exp, DESIGN.md §9).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import LOG2E, exact_dot, one_hot
from ._utils import interpreting, mma

#: Largest head dim (q/k) and value dim of the key-blocked kernels: one register tile each.
JOINT_MAX_HEAD_DIM = 128
#: Columns of the map gradient scattered per one-hot product in the backward (BLOCK_SC).
SCATTER_CHUNK = 32


@triton.jit
def any_token_in(tok, s_mask, lo, hi):
    """Scalar: whether one of the (unmasked) token positions lies in [lo, hi)."""
    hit = (tok >= lo) & (tok < hi) & s_mask
    return tl.sum(hit.to(tl.int32), axis=0) > 0


@triton.jit
def ref_token_positions(rtok, s_mask, SEG_START, SEG_STOP, N_REF):
    """Positions of reference tokens (indices on ``cat(k[:SEG_START], k_ref, k[SEG_STOP:])``)
    as (rt_k, rt_r): the key of ``k`` a token lands on, or -1 when it lands in k_ref; and its
    row of ``k_ref``, or -1. -1 matches no key (positions are >= 0)."""
    in_ref = (rtok >= SEG_START) & (rtok < SEG_START + N_REF) & s_mask
    rt_k = tl.where(rtok < SEG_START, rtok, rtok - N_REF - SEG_START + SEG_STOP)
    rt_k = tl.where(in_ref | (s_mask == 0), -1, rt_k)
    rt_r = tl.where(in_ref, rtok - SEG_START, -1)
    return rt_k, rt_r


@triton.jit
def block_logits(q, k_ptr, stride_kn, stride_kd, bias_ptr, stride_bn, offs_n, n_mask, offs_d,
                 d_mask, sm_scale, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 DOT_UPCAST: tl.constexpr):
    """(s, k): logits q·kᵀ·scale + bias of one key block [BLOCK_M, BLOCK_N] (fp32, -inf on keys
    past ``n_mask``) and the loaded key tile [BLOCK_N, BLOCK_D] (zeros past the masks).

    Logits stay in natural units (scaled by log2 e only after the max is subtracted): with a
    -10000 padding bias, an extra rounding at that magnitude would cost ~1e-3."""
    k = tl.load(k_ptr + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=n_mask[:, None] & d_mask[None, :], other=0.0)
    s = mma(q, tl.trans(k), None, DOT_PRECISION, DOT_UPCAST) * sm_scale
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bn, mask=n_mask, other=0.0)
        s = s + bias.to(tl.float32)[None, :]
    return tl.where(n_mask[None, :], s, float("-inf")), k


@triton.jit
def gather_logits(q, k_ptr, stride_kn, stride_kd, bias_ptr, stride_bn, pos, valid, offs_d, d_mask,
                  sm_scale, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  DOT_UPCAST: tl.constexpr):
    """Logits [BLOCK_M, BLOCK_S] of the keys at positions ``pos`` (``valid`` lanes; others give
    0 and must be masked by the caller): the selected columns without walking every key."""
    k = tl.load(k_ptr + pos[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=valid[:, None] & d_mask[None, :], other=0.0)
    s = mma(q, tl.trans(k), None, DOT_PRECISION, DOT_UPCAST) * sm_scale
    if HAS_BIAS:
        bias = tl.load(bias_ptr + pos * stride_bn, mask=valid, other=0.0)
        s = s + bias.to(tl.float32)[None, :]
    return s


@triton.jit
def shifted(m):
    """The row max used as exponent shift: -inf (no live key yet) shifts by 0, so every exp2 of
    a -inf logit is 0, never NaN."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def online_update(m_i, s):
    """(m_new, shift, alpha, p): the running max after block ``s``, its safe shift, the factor
    rescaling sums taken at the old max, and exp(s − shift)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    shift = shifted(m_new)
    alpha = tl.math.exp2((m_i - shift) * LOG2E)
    p = tl.math.exp2((s - shift[:, None]) * LOG2E)
    return m_new, shift, alpha, p


@triton.jit
def carry_columns(acc, p, tok, s_mask, offs_n, hit, SPLIT_DOT: tl.constexpr):
    """acc + P[:, tok] for a key block (the one-hot product runs only when ``hit``)."""
    if hit:
        acc += exact_dot(p, one_hot(tok, s_mask, offs_n, True), SPLIT_DOT)
    return acc


@triton.jit
def scatter_columns(dp, g_ptr, g_rows, row_mask, stride_gm, stride_gs, tok_ptr, stride_toks, NUM_SEL, offs_n,
                    hit, SEG_START, SEG_STOP, N_REF, KIND: tl.constexpr, BLOCK_SC: tl.constexpr,
                    SPLIT_DOT: tl.constexpr):
    """dp + scatter(G) onto the key block's columns (duplicates add), only when ``hit``.

    G [rows, S] is read from memory (``g_ptr``, rows ``g_rows``) in chunks of BLOCK_SC columns
    with their token positions (``tok_ptr``): no [BLOCK_M, S] tile lives across the key walk
    (at S = 77 that tile and its one-hot matrix made the backward spill). KIND: 0 the positions
    as given, 1 reference tokens landing on ``k``, 2 those landing on ``k_ref``."""
    if hit:
        for s0 in range(0, NUM_SEL, BLOCK_SC):
            offs_s = s0 + tl.arange(0, BLOCK_SC)
            s_mask = offs_s < NUM_SEL
            tok = tl.load(tok_ptr + offs_s * stride_toks, mask=s_mask, other=-1).to(tl.int32)
            if KIND != 0:
                rt_k, rt_r = ref_token_positions(tok, s_mask, SEG_START, SEG_STOP, N_REF)
                tok = rt_k if KIND == 1 else rt_r
            g = tl.load(g_ptr + g_rows[:, None] * stride_gm + offs_s[None, :] * stride_gs,
                        mask=row_mask[:, None] & s_mask[None, :], other=0.0)
            dp += exact_dot(g, one_hot(tok, s_mask, offs_n, False), SPLIT_DOT)
    return dp


@triton.jit
def row_stats(shift, l_i):
    """(1 / row sum, lse) at the end of the key loop: a row with no live key (l = 0) gives
    1/l = 1 (its sums are 0, so outputs are 0) and lse = +inf (P = 0 in backward)."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse = tl.where(l_i == 0.0, float("inf"), shift + tl.math.log2(l_safe) / LOG2E)
    return 1.0 / l_safe, lse


# ---- launch policy (Python) -------------------------------------------------------------------
def dim_block(dim: int) -> int:
    """BLOCK_D: the whole head (or value) dim in one power-of-two tile, at least 16 (masked)."""
    return max(16, triton.next_power_of_2(max(1, dim)))


def key_blocks(start: int, stop: int, block_n: int) -> int:
    return triton.cdiv(max(0, stop - start), block_n)


#: Fixed tiles under the interpreter (each Triton op costs ~ms of Python there, whatever the tile):
#: 64 x 64, so that 77 keys already span two blocks, the last one partial (online softmax and the
#: key masks exercised), at the fewest programs.
INTERPRETER_TILES = (64, 64, 4)


def tiles(dtype: torch.dtype, head_dim: int, num_selected: int, backward: bool,
          ref: bool = False, dq_pass: bool = False) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of a key-blocked launch, from the shapes only (no autotuning:
    the dk/dv accumulation order and the loss bits must not depend on a tuning run).

    fp16/bf16: 64 x 64 with 4 warps (flash attention's forward tile for head dims <= 128); the
    backward and launches carrying > 32 selected columns (S = 77: three [BLOCK_M, 128] fp32
    column accumulators with a reference) take 32-row tiles, and a backward with > 32 columns
32-key blocks (its one-hot scatter matrices are [BLOCK_S, BLOCK_N]) and, with the reference's
gradient, 16-row tiles (32 spilled 8 B at head dim 72 on sm_80). 8 warps for every backward
(4 spilled 8 B at head dim 64 on sm_90), for > 32 columns and for every forward with a reference
(4 spilled 24-96 B on sm_80 at head dim 64, S = 77, and faulted on an H200 at head dim 64).
    fp32 (exact-fp32 dots on FMA units, operands in registers) 32 x 32.
    ``python -m semfid.info --compile-check`` compiles each."""
    if interpreting():
        return INTERPRETER_TILES
    if dtype == torch.float32:
        return 32, 32, 4
    wide = triton.next_power_of_2(max(1, num_selected)) > 32
    block_m = 64
    if backward or wide:
        block_m = 16 if (backward and wide and ref) else 32
    block_n = 32 if (backward and wide) else 64
    # 8 warps for every forward with the reference: 64 x 64 on 4 warps (SD3's head dim 64) hit an
    # illegal memory access on an H200 (Triton 3.6, 2026-12-04), where 8 warps and 32-row tiles ran.
    warps = 8 if (backward or wide or ref) else 4
    if not backward and ref and head_dim % 16:
        block_m = 32  # head dim 72 (2-byte loads): 64 rows spilled 16 B on sm_90
    if dq_pass and head_dim > 64:
        block_n = 32  # 64-key blocks spilled 24 B at head dim 128 on sm_90
    if dq_pass and block_m == 16:
        warps = 4  # 8 warps on 16-row tiles: capped at 128 registers, 8-40 B spilled (head dim 128)
    if dq_pass and ref and head_dim <= 64:
        # The dq pass with the reference's gradient at head dim 64: ptxas capped it at 128
        # registers and spilled 32-48 B on sm_80 at every 8-warp tile; 16 x 32 on 4 warps does not.
        block_m, block_n, warps = 16, 32, 4
    return block_m, block_n, warps


def strides_or_zeros(t: Optional[torch.Tensor], n: int) -> Tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n
