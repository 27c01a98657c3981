"""The portable, memory-efficient PyTorch backend (CPU and CUDA, every dtype).

Forward and backward walk the queries in chunks, so the largest temporary is one
[B, H, chunk, M] block of probabilities (≈2 MiB) and nothing of size [B, H, N, M] is ever kept:
backward recomputes P from q and k (this backend does not need the saved lse, which it still
writes for the shared contract). Chunks are computed in float32 (float64 for
float64 inputs), so half-precision inputs get fp32 softmax and accumulation.

Backward per chunk (P recomputed, G = map gradient scattered onto the selected columns)::

    dP = dO · Vᵀ + scatter(G)
    dS = P ⊙ (dP − rowsum(P ⊙ dP))                       (softmax backward, one fused op)
    dQ = dS · K · scale,   dK += dSᵀ · Q · scale,   dV += Pᵀ · dO

``out`` is not needed: rowsum(P ⊙ dP) is taken on the recomputed chunk instead of as
rowsum(dO ⊙ O) + rowsum(P_sel ⊙ G), which costs the same and matches eager autograd's rounding.
"""

from __future__ import annotations

from typing import Iterator

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


def _dead_rows(bias: torch.Tensor) -> torch.Tensor:
    """[B, H, 1] mask of the (batch, head) pairs whose keys are all -inf (P = 0, lse = +inf)."""
    return torch.isneginf(bias).all(dim=-1)[:, :, None]


class _Operands:
    """The per-call tensors both passes share, in the accumulation dtype.

    ``k_t_scaled`` is kᵀ·scale [B, H, D, M] (scale folded in once), ``k_scaled`` its transpose for
    dQ = dS·K·scale; ``dead_rows`` [B, H, 1, 1] marks (batch, head) pairs whose keys are all -inf
    (None when there are none): softmax would give NaN there, the contract says P = 0.
    """

    def __init__(self, k, v, bias, scale):
        self.acc = accumulation_dtype(k.dtype)
        self.k_scaled = k.to(self.acc) * scale
        self.k_t_scaled = self.k_scaled.transpose(-1, -2)
        self.v = None if v is None else v.to(self.acc)
        self.bias = None if bias is None else bias[:, :, None, :]
        self.dead_rows = None
        if bias is not None:
            dead = _dead_rows(bias)[..., None]
            # One host sync on CUDA; skipped entirely while tracing (the where below is then kept).
            if torch.compiler.is_compiling() or bias.device.type != "cpu" or bool(dead.any()):
                self.dead_rows = dead

    def logits(self, qc: torch.Tensor) -> torch.Tensor:
        """[B, H, c, M] logits q·kᵀ·scale + bias."""
        s = torch.matmul(qc.to(self.acc), self.k_t_scaled)
        return s.add_(self.bias) if self.bias is not None else s

    def softmax(self, s: torch.Tensor) -> torch.Tensor:
        """P = softmax(s) over the keys, 0 on fully masked rows."""
        p = torch.softmax(s, dim=-1)
        return p.masked_fill_(self.dead_rows, 0.0) if self.dead_rows is not None else p

    def probabilities(self, qc: torch.Tensor) -> torch.Tensor:
        """P of a query chunk [B, H, c, M].

        Backward recomputes P with the forward's own fused softmax rather than as exp(logit − lse):
        as cheap (one pass), and bit-identical to the forward, whereas an fp32 lse of a row padded
        with −10000 is only good to ~5e-4 and would make P that much off.
        """
        return self.softmax(self.logits(qc))


def _fused_cpu_attention_applies(q, k, v) -> bool:
    """PyTorch's fused CPU attention kernel returns (out, lse) for equal q/v head dims."""
    return (q.device.type == "cpu" and v is not None and v.shape[-1] == q.shape[-1]
            and q.shape[2] > 0 and not torch.compiler.is_compiling())


def _fused_cpu_forward(q, k, v, bias, scale, mean_heads) -> ForwardResult:
    """Output-only forward through ``aten._scaled_dot_product_flash_attention_for_cpu``.

    With no maps to write, PyTorch's own fused kernel (blocked, fp32 accumulation, all threads)
    computes out and the natural-log lse faster than the chunk loop; rows whose keys are all -inf
    come back as zeros with lse 0, which the contract turns into +inf.
    """
    mask = None if bias is None else bias[:, :, None, :].to(q.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, attn_mask=mask, scale=scale)
    lse = lse.to(accumulation_dtype(q.dtype))
    if bias is not None:
        lse = lse.masked_fill(_dead_rows(bias), float("inf"))
    _, _, maps = empty_forward_outputs(q, k, v, None, mean_heads)
    return out, lse, maps


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
        if select is None and _fused_cpu_attention_applies(q, k, v):
            return _fused_cpu_forward(q, k, v, bias, scale, mean_heads)
        ops = _Operands(k, v, bias, scale)
        out, lse, maps = empty_forward_outputs(q, k, v, select, mean_heads)
        for rows in _chunks(N, _chunk_rows(B, H, k.shape[2])):
            s = ops.logits(q[:, :, rows])
            p = ops.softmax(s)
            # lse = max logit − log(max probability): both maxima sit on the same key, and
            # p_max ≥ 1/M, so the log is exact to float rounding (no separate logsumexp pass).
            row_lse = s.amax(dim=-1).sub_(p.amax(dim=-1).log_())
            if ops.dead_rows is not None:
                row_lse = row_lse.masked_fill_(ops.dead_rows[..., 0], float("inf"))
            lse[:, :, rows] = row_lse
            if ops.v is not None:
                out[:, :, rows] = torch.matmul(p, ops.v)
            if select is not None:
                picked = torch.gather(p, -1, _map_index(select, H, p.shape[2]))
                maps[..., rows, :] = picked.mean(dim=1) if mean_heads else picked
        return out, lse, maps

    @staticmethod
    def backward(q, k, v, bias, select, scale, mean_heads, out, lse, dout, dmaps) -> BackwardResult:
        B, H, N, _ = q.shape
        ops = _Operands(k, v, bias, scale)
        has_dout = v is not None and dout is not None
        has_dmaps = select is not None and dmaps is not None

        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.zeros(k.shape, dtype=ops.acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=ops.acc, device=q.device) if v is not None else None

        for rows in _chunks(N, _chunk_rows(B, H, k.shape[2])):
            qc = q[:, :, rows].to(ops.acc)
            p = ops.probabilities(qc)
            if has_dout:
                do_c = dout[:, :, rows].to(ops.acc)
                dp = torch.matmul(do_c, ops.v.transpose(-1, -2))
                dv.add_(torch.matmul(p.transpose(-1, -2), do_c))
            else:
                dp = torch.zeros_like(p)
            if has_dmaps:
                g = dmaps[..., rows, :].to(ops.acc)
                g = (g / H).unsqueeze(1).expand(B, H, -1, -1) if mean_heads else g
                dp.scatter_add_(-1, _map_index(select, H, p.shape[2]), g)
            # dS = P ⊙ (dP − rowsum(P ⊙ dP)), fused.
            ds = torch._softmax_backward_data(dp, p, -1, ops.acc)
            dq[:, :, rows] = torch.matmul(ds, ops.k_scaled)
            dk.add_(torch.matmul(ds.transpose(-1, -2), qc))
        dv_out = dv.to(v.dtype) if dv is not None else q.new_empty(0)
        return dq, dk.mul_(scale).to(k.dtype), dv_out
