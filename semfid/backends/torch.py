"""The portable, memory-efficient PyTorch backend (CPU and CUDA, every dtype).

Forward and backward walk the queries in chunks, so the largest temporary is one
[B, H, chunk, M] block of probabilities (≈2 MiB) and nothing of size [B, H, N, M] is ever kept:
backward recomputes P from q, k and the saved lse. Chunks are computed in float32 (float64 for
float64 inputs), so half-precision inputs get fp32 softmax and accumulation.

Backward per chunk (P recomputed, G = map gradient scattered onto the selected columns)::

    dP    = dO · Vᵀ + scatter(G)
    delta = rowsum(dO ⊙ O) + rowsum(P[..., sel] ⊙ G)        (= rowsum(P ⊙ dP))
    dS    = P ⊙ (dP − delta)
    dQ    = dS · K · scale,   dK += dSᵀ · Q · scale,   dV += Pᵀ · dO
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from .._inputs import accumulation_dtype
from . import register_backend
from .base import BackendBase, BackwardResult, ForwardResult, empty_forward_outputs

# Elements of one fp32 probability block [B, H, chunk, M]: 2**19 (2 MiB) measured fastest on a
# 2-core CPU for the SD1.5 4096-query layer (B=2, H=8, M=77: chunks of ~425 queries).
_BLOCK_ELEMENTS = 1 << 19
_MIN_CHUNK = 64


def _chunks(n: int, rows_per_chunk: int) -> Iterator[slice]:
    for start in range(0, n, rows_per_chunk):
        yield slice(start, min(start + rows_per_chunk, n))


def _chunk_rows(B: int, H: int, M: int) -> int:
    return max(_MIN_CHUNK, _BLOCK_ELEMENTS // max(1, B * H * M))


def _map_index(select: torch.Tensor, H: int, rows: int) -> torch.Tensor:
    """[B, S] -> [B, H, rows, S] view used to gather/scatter the selected columns."""
    B, S = select.shape
    return select[:, None, None, :].expand(B, H, rows, S)


def _logits(qc: torch.Tensor, k_scaled_t: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """[B, H, c, M] logits q·kᵀ·scale + bias in the accumulation dtype."""
    s = torch.matmul(qc, k_scaled_t)
    if bias is not None:
        s += bias[:, :, None, :]
    return s


@register_backend
class TorchBackend(BackendBase):
    """Chunked PyTorch implementation: runs anywhere, keeps only q, k, v, out and lse for backward."""

    NAME = "torch"
    SUPPORTED_DEVICES = frozenset({"cpu", "cuda"})
    SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
    PRIORITY = 100
    # The portable fallback: auto may always take it, even where faster backends are unvalidated.
    AUTO_DEVICES = frozenset({"cpu", "cuda"})

    @classmethod
    def status(cls) -> str:
        return "tested on CPU; the same code runs on CUDA tensors"

    @staticmethod
    def forward(q, k, v, bias, select, scale, mean_heads) -> ForwardResult:
        B, H, N, _ = q.shape
        M = k.shape[2]
        acc = accumulation_dtype(q.dtype)
        k_scaled_t = (k.to(acc) * scale).transpose(-1, -2)
        v_acc = None if v is None else v.to(acc)

        out, lse, maps = empty_forward_outputs(q, k, v, select, mean_heads)

        for rows in _chunks(N, _chunk_rows(B, H, M)):
            s = _logits(q[:, :, rows].to(acc), k_scaled_t, bias)
            row_max = s.amax(dim=-1, keepdim=True)
            # A row with every key at -inf has max -inf: shift by 0 instead so exp gives 0, not NaN.
            row_max = torch.where(row_max == float("-inf"), torch.zeros_like(row_max), row_max)
            p = s.sub_(row_max).exp_()
            row_sum = p.sum(dim=-1, keepdim=True)
            # lse = +inf for fully masked rows (see base.py); NaN inputs keep NaN.
            lse[:, :, rows] = torch.where(
                row_sum == 0, torch.full_like(row_sum, float("inf")), row_max + row_sum.log()
            ).squeeze(-1)
            inv_sum = torch.where(row_sum > 0, row_sum.reciprocal(), torch.zeros_like(row_sum))
            p.mul_(inv_sum)  # rows holding a NaN are NaN already and stay NaN
            if v_acc is not None:
                out[:, :, rows] = torch.matmul(p, v_acc)
            if select is not None:
                picked = torch.gather(p, -1, _map_index(select, H, p.shape[2]))
                maps[..., rows, :] = picked.mean(dim=1) if mean_heads else picked
        return out, lse, maps

    @staticmethod
    def backward(q, k, v, bias, select, scale, mean_heads, out, lse, dout, dmaps) -> BackwardResult:
        B, H, N, _ = q.shape
        M = k.shape[2]
        acc = accumulation_dtype(q.dtype)
        k_acc = k.to(acc)
        k_scaled_t = (k_acc * scale).transpose(-1, -2)
        v_acc = None if v is None else v.to(acc)
        has_dout = v is not None and dout is not None
        has_dmaps = select is not None and dmaps is not None

        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc, device=q.device) if v is not None else None

        for rows in _chunks(N, _chunk_rows(B, H, M)):
            qc = q[:, :, rows].to(acc)
            lse_c = lse[:, :, rows, None]
            p = _logits(qc, k_scaled_t, bias).sub_(lse_c).exp_()
            if has_dout:
                do_c = dout[:, :, rows].to(acc)
                dp = torch.matmul(do_c, v_acc.transpose(-1, -2))
                delta = (do_c * out[:, :, rows].to(acc)).sum(dim=-1, keepdim=True)
                dv += torch.matmul(p.transpose(-1, -2), do_c)
            else:
                dp = torch.zeros_like(p)
                delta = torch.zeros_like(lse_c)
            if has_dmaps:
                g = dmaps[..., rows, :].to(acc)
                g = (g / H).unsqueeze(1).expand(B, H, -1, -1) if mean_heads else g
                index = _map_index(select, H, p.shape[2])
                dp.scatter_add_(-1, index, g)
                delta = delta + (torch.gather(p, -1, index) * g).sum(dim=-1, keepdim=True)
            ds = p.mul_(dp.sub_(delta))
            dq[:, :, rows] = torch.matmul(ds, k_acc).mul_(scale)
            dk += torch.matmul(ds.transpose(-1, -2), qc).mul_(scale)
        dv_out = dv.to(v.dtype) if dv is not None else q.new_empty(0)
        return dq, dk.to(k.dtype), dv_out
