"""The key sets of the torch backend's Python subject op (target and reference as one batch)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._inputs import SubjectInputs, accumulation_dtype
from .torch_xattn import _dead_mask_or_none, _map_index

Tensor = torch.Tensor


class _SubjectKeys:
    """Keys of the subject op as [B·H, K, D] batches (3-D ``bmm``/``baddbmm``: no per-call
    reshapes, the bias folded into the logits matmul; the scale goes into the query chunk).

    ``paired=True``: the target and reference keys as one set of K = 2·M' keys (see module
    docstring); probabilities are viewed as [B·H, c, 2, M'], index 0 of dim -2 being the target.
    ``paired=False``: the target keys alone (K = M), for the backward that needs no A_r.
    """

    def __init__(self, inp: SubjectInputs, paired: bool):
        acc = self.acc = accumulation_dtype(inp.dtype)
        B, H, M, D = inp.k.shape
        M_ref = inp.k_ref.shape[2]
        self.B, self.H, self.M, self.M_ref = B, H, M, M_ref
        self.scale = inp.scale
        self.width = width = max(M, M_ref) if paired else M
        self.segments = 2 if paired else 1
        if not paired:
            keys = inp.k.to(acc)
        elif M == M_ref:
            keys = torch.cat([inp.k, inp.k_ref], dim=2).to(acc)  # a fresh contiguous tensor
        else:
            keys = inp.q.new_zeros(B, H, 2 * width, D, dtype=acc)
            keys[:, :, :M] = inp.k
            keys[:, :, width:width + M_ref] = inp.k_ref
        self.keys = keys.reshape(B * H, -1, D)  # a copy only for a strided (diffusers) k
        self.keys_t = self.keys.transpose(1, 2)
        v = inp.v.to(acc)
        if width != M:  # the target segment is M' wide: zero value rows under its padding keys
            v = torch.nn.functional.pad(v, (0, 0, 0, width - M))
        self.v = v.reshape(B * H, width, -1)
        self.bias = self._bias(inp, paired)
        self.dead_rows = None
        if self.bias is not None:
            dead = torch.isneginf(self.bias.view(B * H, 1, self.segments, width)).all(dim=-1)
            self.dead_rows = _dead_mask_or_none(dead[..., None], self.bias)
        if paired:
            self.index = torch.cat([inp.tokens, inp.ref_tokens + width], dim=1)
        else:
            self.index = inp.tokens

    def _bias(self, inp: SubjectInputs, paired: bool) -> Optional[Tensor]:
        """[B·H, 1, K] logit bias (None when no key is biased or padded)."""
        B, H, M, M_ref, W = self.B, self.H, self.M, self.M_ref, self.width
        if not paired:
            return None if inp.bias is None else inp.bias.reshape(B * H, 1, M).to(self.acc)
        if inp.bias is None and inp.ref_bias is None and M == M_ref:
            return None
        bias = inp.q.new_zeros(B, H, 2 * W, dtype=self.acc)
        bias[:, :, M:W] = float("-inf")
        bias[:, :, W + M_ref:] = float("-inf")
        if inp.bias is not None:
            bias[:, :, :M] = inp.bias
        if inp.ref_bias is not None:
            bias[:, :, W:W + M_ref] = inp.ref_bias
        return bias.view(B * H, 1, 2 * W)

    def queries(self, t: Tensor, rows: slice, scale: Optional[float] = None) -> Tensor:
        """[B·H, c, D] contiguous chunk of a [B, H, N, D] tensor (q or dout) in the acc dtype,
        times ``scale`` when given (the logit scale is folded into the query chunk)."""
        chunk = t[:, :, rows]
        B, H, c = self.B, self.H, chunk.shape[2]
        out = torch.empty((B, H, c, chunk.shape[3]), dtype=self.acc, device=t.device)
        if scale is None:
            out.copy_(chunk)
        elif t.dtype == self.acc:
            torch.mul(chunk, scale, out=out)  # one pass: gather the strided rows and scale them
        else:
            out.copy_(chunk).mul_(scale)  # widen first: the product is formed in the acc dtype
        return out.view(B * H, c, -1)

    def probabilities(self, qc: Tensor) -> Tuple[Tensor, Tensor]:
        """(logits, P) of a query chunk, both [B·H, c, segments, M']."""
        if self.bias is not None:
            s = torch.baddbmm(self.bias, qc, self.keys_t)
        else:
            s = torch.bmm(qc, self.keys_t)
        s = s.view(s.shape[0], s.shape[1], self.segments, self.width)
        p = torch.softmax(s, dim=-1)
        if self.dead_rows is not None:
            p.masked_fill_(self.dead_rows, 0.0)
        return s, p

    def gather_maps(self, p: Tensor, mean_heads: bool) -> Tensor:
        """[B, (H,) c, segments·S] selected columns (A_t first, then A_r when paired)."""
        B, H = self.B, self.H
        c = p.shape[1]
        flat = p.view(B, H, c, self.segments * self.width)
        a = torch.gather(flat, -1, _map_index(self.index, H, c))
        return a.mean(dim=1) if mean_heads else a

    def scatter_map_grads(self, dp: Tensor, g: Tensor, mean_heads: bool) -> None:
        """dP[..., index] += G: g [B, c, segments·S] (already divided by H) or [B, H, c, ..]."""
        B, H = self.B, self.H
        c = dp.shape[1]
        if mean_heads:
            g = g.unsqueeze(1).expand(B, H, c, g.shape[-1])
        dp.view(B, H, c, -1).scatter_add_(-1, _map_index(self.index, H, c), g)
