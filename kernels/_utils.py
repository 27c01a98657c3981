"""Block-size helpers and autotuning policy shared by the forward and backward kernels.

Imports only torch and triton (this folder is installed as ``semfid.kernels``).
"""

from __future__ import annotations

import os
from typing import Dict, List

import torch
import triton
import triton.language as tl

#: Largest number of keys one program holds (all keys of a head sit in one block).
MAX_KEYS = 256
#: Largest head dim (q/k) and value dim the kernels take.
MAX_HEAD_DIM = 256

_TL_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def signature_dtype(dtype: torch.dtype) -> str:
    """Triton signature name of a tensor element type ("fp16", "bf16", "fp32")."""
    return _TL_DTYPES[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact fp32 products for fp32 inputs (tf32 would lose ~3 digits
    against PyTorch's fp32 matmul); fp16/bf16 use the tensor cores' native precision."""
    return "ieee" if dtype == torch.float32 else "tf32"


def dot_upcast(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` operands are upcast to fp32: only for bf16 under the interpreter, whose
    numpy matmul has no bf16 (it would multiply the raw bits). There P and dS are not rounded to
    bf16 before the products, so the interpreter is a little more precise than a GPU."""
    return interpreting() and dtype == torch.bfloat16


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """``acc + a @ b`` accumulated in fp32, with ``a`` rounded to ``b``'s dtype (the input dtype) as
    tensor-core operand (flash-attention's choice for P and dS); ``acc`` may be None."""
    if DOT_UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a.to(b.dtype), b, acc, input_precision=DOT_PRECISION)


def key_block(num_keys: int) -> int:
    """BLOCK_N: every key of a head in one block, at least 16 (``tl.dot`` minimum)."""
    return max(16, triton.next_power_of_2(num_keys))


def head_dim_block(head_dim: int, max_block: int = 128) -> int:
    """BLOCK_D: the head dim is processed in chunks of this power of two (16..128).

    Picks the chunk that pads least, then the fewest chunks: 40 -> 3 x 16 (48), 64 -> 1 x 64,
    80 -> 5 x 16 (80), 160 -> 5 x 32 (160, not 256), 256 -> 2 x 128, 8 -> 1 x 16.
    Chunks of >= 16 keep every ``tl.dot`` at its minimum K/N of 16. ``max_block`` caps the chunk
    (see :func:`max_head_dim_block`: 32 in the backward, whose dK/dV tiles are [BLOCK_N, BLOCK_D]
    fp32; 16 for fp32 inputs).
    """
    best, best_cost = 16, None
    for block in (16, 32, 64, 128):
        if block > max_block:
            break
        cost = triton.cdiv(head_dim, block) * block
        if best_cost is None or cost <= best_cost:
            best, best_cost = block, cost
    return best


def query_bucket(num_queries: int) -> int:
    """Autotune key for the query count: next power of two, capped at 4096 (SD's largest layer)."""
    return min(4096, triton.next_power_of_2(max(1, num_queries)))


# ---- autotuning ---------------------------------------------------------------------------------
# Cross-attention over <= 256 keys is memory-bound: a program's tile is BLOCK_M queries x all keys.
# Meant for A100 (sm_80) and H100/H200 (sm_90). num_stages is 1: the loops are short (<= 16
# head-dim chunks, H heads, a few row tiles), and one stage leaves registers and shared memory to
# the [BLOCK_M, BLOCK_N] tiles (not yet measured on a GPU against 2 stages).
#
# Invariant: the configs a launch may run are exactly ``prune(autotune_configs(), args)`` below;
# ``python -m semfid.info --compile-check`` enumerates them through the same function
# (:func:`candidate_configs`), so every config the autotuner can pick for the SD shapes is compiled
# for sm_80/sm_90 and checked for register spills.
_CONFIG_SPACE = [(block_m, warps) for block_m in (16, 32, 64, 128) for warps in (4, 8)]


def autotune_configs() -> List[triton.Config]:
    return [triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=1) for (m, w) in _CONFIG_SPACE]


#: fp32 registers per thread one [BLOCK_M, BLOCK_N] fp32 tile may take (BLOCK_M * BLOCK_N / threads).
#: The compile check (77 keys, SD head dims, sm_80/sm_90) measured: fp16/bf16 tiles of 64 spill in
#: the forward (head dims 40, 160) and the backward (which holds P and dS); 32 do not. fp32 inputs
#: take tl.dot on FMA units with operands in registers: their backward spills at 32 per tile
#: (32 rows x 4 warps: ~500 B; 64 x 8: up to 208 B), 16 (32 rows x 8 warps) does not.
TILE_REGS = {torch.float16: 32, torch.bfloat16: 32, torch.float32: 16}
#: Largest head-dim chunk of the backward: its dK/dV partial tiles are [BLOCK_N, BLOCK_D] fp32.
BWD_MAX_BLOCK_D = 32
#: Largest head-dim chunk for fp32 inputs (both directions). Their ``tl.dot`` is exact fp32
#: ("ieee"), which runs on FMA units with both operands held in registers ([BLOCK_M, BLOCK_D] and
#: [BLOCK_D, BLOCK_N] per thread slice): the compile check showed chunks of 32..128 spilling
#: (up to ~11 KB at 64/128), chunks of 16 not.
FP32_MAX_BLOCK_D = 16


def max_head_dim_block(dtype: torch.dtype, backward: bool) -> int:
    """``max_block`` of :func:`head_dim_block` for a kernel direction and input dtype."""
    if dtype == torch.float32:
        return FP32_MAX_BLOCK_D
    return BWD_MAX_BLOCK_D if backward else 128


def tile_regs(block_m: int, warps: int, block_n: int) -> int:
    """Registers per thread of one fp32 [BLOCK_M, BLOCK_N] tile spread over ``warps`` warps."""
    return block_m * block_n // (32 * warps)


def fits(block_m: int, warps: int, block_n: int, n_bucket: int, dtype: torch.dtype,
         backward: bool = False) -> bool:
    """Can this tile run the shape well:

    * no taller than the queries (32 rows minimum);
    * one fp32 [BLOCK_M, BLOCK_N] tile costs at most ``TILE_REGS[dtype]`` registers per thread;
    * 8 warps on 32 rows only where 4 warps exceed that budget (fp32, or 256 keys): otherwise
      64 rows x 8 warps has the same per-thread cost with half the programs.
    """
    if block_m > max(32, n_bucket):
        return False
    if block_m == 16:  # only the fp32 forward needs tiles this small (see SPILL_EXCLUSIONS)
        return dtype == torch.float32 and warps == 8 and not backward
    budget = TILE_REGS[dtype]
    if tile_regs(block_m, warps, block_n) > budget:
        return False
    return not (block_m == 32 and warps == 8 and tile_regs(32, 4, block_n) <= budget)


#: Configs that pass :func:`fits` but that the compile check saw spill registers for one launch
#: shape, on sm_80 or sm_90: (backward, dtype, HEAD_DIM, mode flags, (BLOCK_M, warps)). The mode flags
#: are the launch's constexprs (forward: HAS_V, HAS_SEL, MEAN_HEADS; backward: HAS_DO, HAS_G); a
#: shape matches when every listed flag has that value. Measured with 77 keys (BLOCK_N 128) and
#: triton 3.9; the compile check re-verifies every config this filter lets through.
SPILL_EXCLUSIONS = [
    # fp32 forward with values (target, per-head and plain passes), every head dim, 32 x 8: under
    # triton 3.8 (torch 2.14's) 255 regs + 96..416 B spill on sm_80 and sm_90; 16 x 8 does not
    # (16 x 4, 32 x 4 and 64 x 8 spill too).
    *((False, torch.float32, d, dict(HAS_V=True), (32, 8)) for d in (40, 64, 80, 160, 256)),
    # fp32 maps-only forward (the reference pass), head dim 40: 128 regs + 24 B spill on sm_90.
    (False, torch.float32, 40, dict(HAS_V=False), (32, 8)),
    # Output-only backward (no map gradient) on sm_80, fp16 and bf16: head dim 64 at 32 x 4
    # (255 regs + 8 B), head dim 256 at 64 x 8 (255 regs + 16 B).
    *((True, dt, 64, dict(HAS_DO=True, HAS_G=False), (32, 4)) for dt in (torch.float16, torch.bfloat16)),
    *((True, dt, 256, dict(HAS_DO=True, HAS_G=False), (64, 8)) for dt in (torch.float16, torch.bfloat16)),
]


def excluded(block_m: int, warps: int, args: Dict, backward: bool) -> bool:
    """Whether :data:`SPILL_EXCLUSIONS` rules this config out for the launch ``args``."""
    for bwd, dtype, head_dim, flags, config in SPILL_EXCLUSIONS:
        if (bwd == backward and dtype == args["Q"].dtype and head_dim == args["HEAD_DIM"]
                and config == (block_m, warps)
                and all(bool(args[name]) == value for name, value in flags.items())):
            return True
    return False


def _prune(configs: List[triton.Config], args: Dict, backward: bool) -> List[triton.Config]:
    """The configs of ``configs`` the autotuner may run for a launch whose (named and constexpr)
    arguments are ``args``: those that :func:`fits` and are not :func:`excluded`.

    Never empty: with no such config, the one of the smallest per-thread tile (then fewest rows)
    among the configs not excluded that are no taller than the queries (or 32 rows)."""
    block_n, n_bucket, dtype = args["BLOCK_N"], args["N_BUCKET"], args["Q"].dtype

    def allowed(c):
        return not excluded(c.kwargs["BLOCK_M"], c.num_warps, args, backward)

    kept = [c for c in configs
            if fits(c.kwargs["BLOCK_M"], c.num_warps, block_n, n_bucket, dtype, backward)
            and allowed(c)]
    if kept:
        return kept
    pool = [c for c in configs if c.kwargs["BLOCK_M"] <= max(32, n_bucket) and allowed(c)] or configs
    smallest = min(pool, key=lambda c: (tile_regs(c.kwargs["BLOCK_M"], c.num_warps, block_n),
                                        c.kwargs["BLOCK_M"]))
    return [smallest]


def prune_fwd_configs(configs, named_args, **kwargs):
    """``early_config_prune`` of the forward kernel (constexprs arrive as ``kwargs``)."""
    return _prune(configs, {**named_args, **kwargs}, backward=False)


def prune_bwd_configs(configs, named_args, **kwargs):
    """``early_config_prune`` of the backward kernel (constexprs arrive as ``kwargs``)."""
    return _prune(configs, {**named_args, **kwargs}, backward=True)


def candidate_configs(named_args: Dict, backward: bool) -> List[triton.Config]:
    """The configs the autotuner may pick for one launch, given its positional arguments by name
    plus its constexprs (as ``launch_args`` builds them); used by the compile check."""
    prune = prune_bwd_configs if backward else prune_fwd_configs
    return prune(autotune_configs(), named_args)


#: Fixed tile used under the interpreter (no autotuning there: it would time numpy).
INTERPRETER_CONFIG = {"BLOCK_M": 32, "num_warps": 4, "num_stages": 1}
