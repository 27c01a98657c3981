"""Block-size helpers and autotuning policy shared by the forward and backward kernels.

Imports only torch and triton (this folder is installed as ``semfid.kernels``).
"""

from __future__ import annotations

import functools
import os
from typing import Dict, List

import torch
import triton
import triton.language as tl

#: Largest number of keys one program holds (all keys of a head sit in one block).
MAX_KEYS = 256
#: Largest head dim (q/k) and value dim the kernels take.
MAX_HEAD_DIM = 256
#: Query rows handled by one backward program are a multiple of this (= the largest BLOCK_M), so the
#: number of dk/dv partials never depends on the autotuned BLOCK_M.
BWD_ROW_GRANULE = 128

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
    (the backward's dK/dV tiles are [BLOCK_N, BLOCK_D] fp32, so it uses at most 32).
    """
    best, best_cost = 16, None
    for block in (16, 32, 64, 128):
        if block > max_block:
            break
        cost = triton.cdiv(head_dim, block) * block
        if best_cost is None or cost <= best_cost:
            best, best_cost = block, cost
    return best


def select_block(num_selected: int) -> int:
    """BLOCK_S: the selected map columns of one row held in registers (no ``tl.dot`` on them)."""
    return triton.next_power_of_2(max(1, num_selected))


def query_bucket(num_queries: int) -> int:
    """Autotune key for the query count: next power of two, capped at 4096 (SD's largest layer)."""
    return min(4096, triton.next_power_of_2(max(1, num_queries)))


# ---- autotuning ---------------------------------------------------------------------------------
# Cross-attention over <= 256 keys is memory-bound: a program's tile is BLOCK_M queries x all keys.
# Meant for A100 (sm_80) and H100/H200 (sm_90). num_stages is 1: the loops are short (<= 16
# head-dim chunks, H heads, a few row tiles), and one stage leaves registers and shared memory to
# the [BLOCK_M, BLOCK_N] tiles (not yet measured on a GPU against 2 stages).
_CONFIG_SPACE = [(block_m, warps) for block_m in (32, 64, 128) for warps in (4, 8)]


def keep(block_m: int, warps: int) -> bool:
    """Static filter of the config space: 8 warps only pay off on 64+ row tiles."""
    return not (block_m == 32 and warps == 8)


def autotune_configs() -> List[triton.Config]:
    return [
        triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=1)
        for (m, w) in _CONFIG_SPACE
        if keep(m, w)
    ]


#: fp32 registers per thread one [BLOCK_M, BLOCK_N] tile may take. The compile check (fp16, M=77,
#: sm_80/sm_90) showed 64 per tile spilling in the forward at head dims 40 and 160 and in the
#: backward (which holds P and dS), while 32 compiled without spills.
FWD_TILE_REGS = 32
BWD_TILE_REGS = 32
#: Largest head-dim chunk of the backward: its dK/dV partial tiles are [BLOCK_N, BLOCK_D] fp32.
BWD_MAX_BLOCK_D = 32


def fits(block_m: int, warps: int, block_n: int, n_bucket: int, tile_regs: int) -> bool:
    """Can this tile run the shape well: no taller than the queries (32 rows minimum), and one fp32
    [BLOCK_M, BLOCK_N] tile costs at most ``tile_regs`` registers per thread."""
    if block_m > max(32, n_bucket):
        return False
    return block_m * block_n // (32 * warps) <= tile_regs


def make_prune(tile_regs: int):
    """``early_config_prune`` for a kernel whose tiles may take ``tile_regs`` registers each."""

    def prune(configs, named_args, **kwargs):
        args: Dict = {**named_args, **kwargs}
        block_n, n_bucket = args["BLOCK_N"], args["N_BUCKET"]
        kept = [c for c in configs
                if fits(c.kwargs["BLOCK_M"], c.num_warps, block_n, n_bucket, tile_regs)]
        # The smallest tile (32 rows, 4 warps) is the fallback: never return an empty list.
        return kept or [c for c in configs if c.kwargs["BLOCK_M"] == 32][:1]

    return prune


prune_fwd_configs = make_prune(FWD_TILE_REGS)
prune_bwd_configs = make_prune(BWD_TILE_REGS)


def candidate_configs(block_n: int, n_bucket: int, backward: bool) -> List[triton.Config]:
    """The configs the autotuner may pick for a shape (used by the compile check)."""
    prune = prune_bwd_configs if backward else prune_fwd_configs
    return prune(autotune_configs(), {"BLOCK_N": block_n, "N_BUCKET": n_bucket})


#: Fixed tile used under the interpreter (no autotuning there: it would time numpy).
INTERPRETER_CONFIG = {"BLOCK_M": 32, "num_warps": 4, "num_stages": 1}


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def backward_splits(num_queries: int, batch_heads: int, device: torch.device):
    """(splits, rows_per_split) for the backward grid (splits, B*H).

    Each program walks ``rows_per_split`` queries (a multiple of :data:`BWD_ROW_GRANULE`) of one
    head and accumulates its dk/dv partial; about 4 programs per SM keep the GPU busy while the
    partials (splits x B x H x M x D fp32) stay a small fraction of q's bytes.
    """
    if device.type == "cuda":
        target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target = 2 * batch_heads  # interpreter: exercise several splits and several row blocks
    per_head = max(1, target // max(1, batch_heads))
    rows = triton.cdiv(num_queries, per_head)
    rows = triton.cdiv(rows, BWD_ROW_GRANULE) * BWD_ROW_GRANULE
    return triton.cdiv(num_queries, rows), rows
