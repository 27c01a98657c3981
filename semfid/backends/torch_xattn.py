"""The torch backend's cross-attention (short key sets: the UNet's 77 text keys), in query chunks.

Forward and backward walk the queries in chunks, so the largest temporary is one
[B, H, chunk, M] block of probabilities and nothing of size [B, H, N, M] is ever kept: backward
recomputes P from q and k. Chunks are computed in float32 (float64 for float64 inputs). Long and
joint key sets take :mod:`semfid.backends.joint` instead (blocked over the keys too).

Backward per chunk (P recomputed, G = map gradient scattered onto the selected columns)::

    dP = dO · Vᵀ + scatter(G)
    dS = P ⊙ (dP − rowsum(P ⊙ dP))                       (softmax backward, one fused op)
    dQ = dS · K · scale,   dK += dSᵀ · Q · scale,   dV += Pᵀ · dO
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from .._inputs import XattnInputs, accumulation_dtype
from .base import BackwardResult, ForwardResult, empty_forward_outputs, empty_output, nan_rows, nothing

Tensor = torch.Tensor


def _chunks(n: int, rows_per_chunk: int) -> Iterator[slice]:
    """Query rows in round(n / rows_per_chunk) chunks (at least one) of equal size up to one row:
    the block budget is a target, so a 256-query layer is one chunk of 256, not 212 + 44 (the
    second chunk cost as many calls as the first). The C++ core splits the same way."""
    count = max(1, (n + rows_per_chunk // 2) // rows_per_chunk)
    size = max(1, -(-n // count))  # n = 0: no chunk
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _map_index(select: Tensor, H: int, rows: int) -> Tensor:
    """[B, S] -> [B, H, rows, S] view used to gather/scatter the selected columns."""
    B, S = select.shape
    return select[:, None, None, :].expand(B, H, rows, S)


def _dead_rows(bias: Tensor) -> Tensor:
    """[B, H, 1] mask of the (batch, head) pairs whose keys are all -inf (P = 0, lse = +inf)."""
    return torch.isneginf(bias).all(dim=-1)[:, :, None]


def _dead_mask_or_none(dead: Tensor, bias: Tensor) -> Optional[Tensor]:
    """``dead`` when it may hold a True (always on CUDA / under tracing: no host sync), else None."""
    if torch.compiler.is_compiling() or bias.device.type != "cpu" or bool(dead.any()):
        return dead
    return None


def _row_lse(s: Tensor, p: Tensor) -> Tensor:
    """lse = max logit − log(max probability): both maxima sit on the same key and p_max ≥ 1/M,
    so the log is exact to float rounding (no separate logsumexp pass)."""
    return s.amax(dim=-1).sub_(p.amax(dim=-1).log_())


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
        self.dead_rows = None if bias is None else _dead_mask_or_none(_dead_rows(bias)[..., None], bias)

    def logits(self, qc: Tensor) -> Tensor:
        """[B, H, c, M] logits q·kᵀ·scale + bias."""
        s = torch.matmul(qc.to(self.acc), self.k_t_scaled)
        return s.add_(self.bias) if self.bias is not None else s

    def softmax(self, s: Tensor) -> Tensor:
        """P = softmax(s) over the keys, 0 on fully masked rows."""
        p = torch.softmax(s, dim=-1)
        return p.masked_fill_(self.dead_rows, 0.0) if self.dead_rows is not None else p

    def probabilities(self, qc: Tensor) -> Tensor:
        """P of a query chunk [B, H, c, M].

        Backward recomputes P with the forward's own fused softmax rather than as exp(logit − lse):
        as cheap (one pass), and bit-identical to the forward, whereas an fp32 lse of a row padded
        with −10000 is only good to ~5e-4 and would make P that much off.
        """
        return self.softmax(self.logits(qc))


def xattn_forward(inp: XattnInputs, rows_per_chunk: int) -> ForwardResult:
    """(out, lse, maps) of the xattn contract, query chunk by query chunk (all keys at once)."""
    q, k, v, bias, select = inp.q, inp.k, inp.v, inp.bias, inp.select
    B, H, N, _ = q.shape
    if select is None and _fused_cpu_attention_applies(q, k, v):
        return _fused_cpu_forward(inp)
    ops = _Operands(k, v, bias, inp.scale)
    out, lse, maps = empty_forward_outputs(q, k, v, select, inp.mean_heads)
    for rows in _chunks(N, rows_per_chunk):
        s = ops.logits(q[:, :, rows])
        p = ops.softmax(s)
        row_lse = _row_lse(s, p)
        if ops.dead_rows is not None:
            row_lse = row_lse.masked_fill_(ops.dead_rows[..., 0], float("inf"))
        lse[:, :, rows] = row_lse
        if ops.v is not None:
            out[:, :, rows] = torch.matmul(p, ops.v)
        if select is not None:
            picked = torch.gather(p, -1, _map_index(select, H, p.shape[2]))
            maps[..., rows, :] = picked.mean(dim=1) if inp.mean_heads else picked
    return out, lse, maps


def xattn_backward(inp: XattnInputs, out, lse, dout, dmaps, rows_per_chunk: int) -> BackwardResult:
    """(dq, dk, dv) of the xattn contract, P recomputed per query chunk."""
    q, k, v, select = inp.q, inp.k, inp.v, inp.select
    B, H, N, _ = q.shape
    ops = _Operands(k, v, inp.bias, inp.scale)
    has_dout = v is not None and dout is not None
    has_dmaps = select is not None and dmaps is not None

    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=ops.acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=ops.acc, device=q.device) if v is not None else None

    for rows in _chunks(N, rows_per_chunk):
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
            g = (g / H).unsqueeze(1).expand(B, H, -1, -1) if inp.mean_heads else g
            dp.scatter_add_(-1, _map_index(select, H, p.shape[2]), g)
        # dS = P ⊙ (dP − rowsum(P ⊙ dP)), fused.
        ds = torch._softmax_backward_data(dp, p, -1, ops.acc)
        dq[:, :, rows] = torch.matmul(ds, ops.k_scaled)
        dk.add_(torch.matmul(ds.transpose(-1, -2), qc))
    dv_out = torch.empty_like(v).copy_(dv) if dv is not None else q.new_empty(0)
    return dq, torch.empty_like(k).copy_(dk.mul_(inp.scale)), dv_out


def _fused_cpu_attention_applies(q, k, v) -> bool:
    """PyTorch's fused CPU attention kernel returns (out, lse) for equal q/v head dims."""
    return (q.device.type == "cpu" and v is not None and v.shape[-1] == q.shape[-1]
            and q.shape[2] > 0 and not torch.compiler.is_compiling())


def _fused_cpu_forward(inp: XattnInputs) -> ForwardResult:
    """Output-only forward through ``aten._scaled_dot_product_flash_attention_for_cpu``.

    With no maps to write, PyTorch's own fused kernel (blocked, fp32 accumulation, all threads)
    computes out and the natural-log lse faster than the chunk loop; rows whose keys are all -inf
    come back as zeros with lse 0, which the contract turns into +inf. Its outputs are put into the
    contract's layouts when they differ (the kernel follows q's layout).
    """
    q, bias = inp.q, inp.bias
    mask = None if bias is None else bias[:, :, None, :].to(q.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, inp.k, inp.v, attn_mask=mask, scale=inp.scale)[:2]
    if bias is not None:
        lse = lse.masked_fill(_dead_rows(bias), float("inf"))
    bad = nan_rows(q, inp.k)  # the kernel zeroes NaN rows; the contract propagates NaN
    out = out.masked_fill(bad, float("nan"))
    lse = lse.masked_fill(bad[..., 0], float("nan"))
    layout = empty_output(q, inp.v)
    if out.stride() != layout.stride():
        out = layout.copy_(out)
    lse = lse.to(accumulation_dtype(q.dtype)).contiguous()
    return out, lse, nothing(q)
