"""Triton device functions and launch policy shared by every semfid kernel.

Imports only torch and triton (this folder is installed as ``semfid.kernels``).

* :func:`row_softmax` / :func:`recompute_p` — the full-row softmax of a [BLOCK_M, BLOCK_N] logit
  tile (all keys of a head sit in one block) and its recomputation from the saved lse.
* :func:`one_hot` / :func:`exact_dot` — map gather and scatter as one small matrix product with a
  one-hot matrix built from a vector of token indices (no loop over the selected tokens, no scalar
  loads): ``P[:, tok] = P @ E`` and ``scatter(G) = G @ Eᵀ``, exact to fp32 rounding.
* :func:`backward_splits` / :func:`fill_block_m` — grid shapes derived from the shapes only (never
  from the GPU's SM count or an autotune choice), so the reduction orders, hence the bits of dk/dv
  and of the loss, are the same in every process.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

#: Programs a grid should reach to fill a 132-SM GPU (H100/H200) once. A constant, not the SM count
#: of the device at hand: splits and tiles derived from it must not change between processes.
FILL_PROGRAMS = 132
#: Backward programs aimed for (about 4 per SM of a 132-SM GPU).
BWD_TARGET_PROGRAMS = 4 * FILL_PROGRAMS
#: Query rows of one backward program are a multiple of this (a multiple of every backward BLOCK_M
#: the policies pick: 32 or 64).
BWD_ROW_GRANULE = 64


@triton.jit
def aligned_strides(stride_b, stride_h, stride_m, ALIGNED: tl.constexpr):
    """One tensor's (batch, head, row) strides, in a form Triton's alignment analysis reads as
    multiples of 8 elements when ALIGNED, so that 16-byte vector loads survive head dim 40 (SD1.5's
    head stride 40 is not a multiple of 16). The launcher passes ALIGNED only when every such
    stride is a multiple of 8 (:func:`aligned8`), so ``stride // 8 * 8`` is exact; ``tl.multiple_of``
    on a kernel argument is dropped (the sm_90 PTX kept 2-byte loads), see ``test_triton_compile``."""
    if ALIGNED:
        stride_b = stride_b // 8 * 8
        stride_h = stride_h // 8 * 8
        stride_m = stride_m // 8 * 8
    return stride_b, stride_h, stride_m


@triton.jit
def row_softmax(s):
    """(P, lse) of a [BLOCK_M, BLOCK_N] fp32 logit tile whose masked keys hold -inf.

    A row whose keys are all -inf has max -inf: it is shifted by 0, so every exp2 is 0 (not NaN),
    P = 0 and lse = +inf. A NaN logit keeps its row NaN. lse is in natural log."""
    m_i = tl.max(s, axis=1)
    m_i = tl.where(m_i == float("-inf"), 0.0, m_i)
    p = tl.math.exp2((s - m_i[:, None]) * LOG2E)
    l_i = tl.sum(p, axis=1)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.math.log2(l_safe) * LN2)
    return p / l_safe[:, None], lse


@triton.jit
def recompute_p(s, lse):
    """P from the logits and the saved lse (+inf gives 0), renormalised over the row: an fp32 lse
    of magnitude ~1e4 (a -10000 padding bias) is only good to ~5e-4, which would scale the row."""
    p = tl.math.exp2((s - lse[:, None]) * LOG2E)
    l_i = tl.sum(p, axis=1)
    return p / tl.where(l_i == 0.0, 1.0, l_i)[:, None]


@triton.jit
def one_hot(tok, s_mask, offs_n, KEYS_FIRST: tl.constexpr):
    """Boolean one-hot matrix of the token vector ``tok`` [BLOCK_S] (columns ``s_mask`` off are
    all zero): [BLOCK_N, BLOCK_S] with E[n, j] = (tok[j] == n) when KEYS_FIRST, else its transpose."""
    if KEYS_FIRST:
        return (offs_n[:, None] == tok[None, :]) & s_mask[None, :]
    else:
        return (tok[:, None] == offs_n[None, :]) & s_mask[:, None]


@triton.jit
def exact_dot(a, e, SPLIT: tl.constexpr):
    """``a @ e`` for an fp32 tile ``a`` and a one-hot (0/1) matrix ``e``, exact to fp32 rounding.

    Each output is a sum of a few entries of ``a`` (one for a gather; one per duplicate for a
    scatter). SPLIT (on a GPU): ``a`` is split into three bfloat16 pieces hi + mid + lo, which hold
    its 24 significant bits and fp32's exponent range; each product with 0/1 is exact and the
    tensor cores accumulate in fp32, so S = 77 costs three small MMAs instead of 77 passes over
    the tile. Without SPLIT (the interpreter, whose numpy dot is fp32): one fp32 product."""
    if SPLIT:
        eb = e.to(tl.bfloat16)
        hi = a.to(tl.bfloat16)
        rest = a - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
        acc = tl.dot(hi, eb, out_dtype=tl.float32)
        acc = tl.dot(mid, eb, acc, out_dtype=tl.float32)
        return tl.dot(lo, eb, acc, out_dtype=tl.float32)
    else:
        return tl.dot(a, e.to(tl.float32), input_precision="ieee")


def select_block(num_selected: int) -> int:
    """BLOCK_S: the selected columns of one row, a power of two >= 16 (the one-hot ``tl.dot``
    needs K, N >= 16)."""
    return max(16, triton.next_power_of_2(max(1, num_selected)))


def aligned8(*tensors) -> bool:
    """Whether every batch/head/row stride of the (present) tensors is a multiple of 8 elements
    and their last dim is unit-stride: then each row start is 16-byte aligned in fp16/bf16 and the
    kernels may promise it (:func:`aligned_strides`), keeping 8-element vector loads at head dim
    40 (SD1.5's head stride 40 is not a multiple of 16, so Triton would not infer it)."""
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        if t.stride(-1) != 1 or any(s % 8 for s in t.stride()[:-1]):
            return False
    return True


def fill_block_m(num_queries: int, programs_per_block: int, largest: int = 64) -> int:
    """BLOCK_M of a grid (cdiv(N, BLOCK_M), programs_per_block): the largest of 64/32/16 rows
    whose grid reaches :data:`FILL_PROGRAMS`, else 16 (the ``tl.dot`` minimum)."""
    block = largest
    while block > 16 and triton.cdiv(num_queries, block) * programs_per_block < FILL_PROGRAMS:
        block //= 2
    return block


def backward_splits(num_queries: int, batch_heads: int):
    """(splits, rows_per_split) of a backward grid (splits, B*H), from the shapes only.

    Each program walks ``rows_per_split`` queries (a multiple of :data:`BWD_ROW_GRANULE`) of one
    head and accumulates its own fp32 dk/dv partial; about :data:`BWD_TARGET_PROGRAMS` programs
    keep a GPU busy while the partials (splits x B x H x M x D fp32) stay small against q."""
    per_head = max(1, BWD_TARGET_PROGRAMS // max(1, batch_heads))
    rows = triton.cdiv(max(1, num_queries), per_head)
    rows = triton.cdiv(rows, BWD_ROW_GRANULE) * BWD_ROW_GRANULE
    return triton.cdiv(max(1, num_queries), rows), rows


@triton.jit
def _sum_splits_kernel(
    PART, OUT, SPLITS, H, N_ROWS, DIM,
    stride_ob, stride_oh, stride_on, stride_od,
    BLOCK: tl.constexpr,
):
    """OUT[b, h, n, d] = Σ_{i < SPLITS} PART[i, b·H + h, n, d], summed in the order i = 0, 1, ...
    (bitwise reproducible), cast to OUT's dtype and written with OUT's strides.

    PART is contiguous fp32 [SPLITS, B·H, N_ROWS, DIM]. Grid: (B·H, cdiv(N_ROWS·DIM, BLOCK))."""
    pid_bh = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N_ROWS * DIM
    n = offs // DIM
    d = offs % DIM
    plane = N_ROWS * DIM
    src = PART + tl.cast(pid_bh, tl.int64) * plane + offs
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, SPLITS):
        acc += tl.load(src + tl.cast(i, tl.int64) * tl.num_programs(0) * plane, mask=mask, other=0.0)
    off_b = tl.cast(pid_bh // H, tl.int64)
    off_h = tl.cast(pid_bh % H, tl.int64)
    dst = OUT + off_b * stride_ob + off_h * stride_oh + n * stride_on + d * stride_od
    tl.store(dst, acc.to(OUT.dtype.element_ty), mask=mask)


_SUM_BLOCK = 1024


def sum_splits_into(part: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Reduce fp32 partials [splits, B, H, M, D] into ``out`` [B, H, M, D] (any strides, any float
    dtype) with one launch; returns ``out``."""
    splits, B, H, M, D = part.shape
    if out.numel() == 0:
        return out
    grid = (B * H, triton.cdiv(M * D, _SUM_BLOCK))
    _sum_splits_kernel[grid](part, out, splits, H, M, D, *out.stride(), BLOCK=_SUM_BLOCK, num_warps=4)
    return out


def device_guard(t: torch.Tensor):
    """Context in which a launch runs on ``t``'s GPU and on that GPU's current stream (Triton
    launches on ``torch.cuda.current_device()``); a no-op for CPU tensors (the interpreter)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
