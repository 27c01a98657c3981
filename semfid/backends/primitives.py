"""Attention over any number of keys returning lse, and its backward: the primitives the joint
key-set paths (:mod:`semfid.backends.joint`) are built from.

Three implementations of one interface (``attend`` / ``attend_backward``, shapes below):

* :class:`Blocked` — PyTorch math walking the queries *and* the keys in blocks with the online
  softmax (flash attention's loop, in Python): runs on any device and dtype. The largest
  temporary is one logit block of ``B·H·rows·cols`` elements with ``cols <= KEY_BLOCK`` and
  ``B·H·rows·cols <= BLOCK_ELEMENTS`` (or ``rows = 16`` when B·H·cols alone exceeds it).
* :class:`FusedCpu` — PyTorch's fused CPU flash-attention kernels
  (``aten::_scaled_dot_product_flash_attention_for_cpu`` and its ``_backward``), blocked over
  queries and keys in C++; the backward takes the saved out and lse (nothing recomputed).
* :class:`SdpaFused` — the ``sdpa`` backend's forward (:func:`semfid.backends.sdpa.attend`: the
  fused CPU kernel, memory-efficient on CUDA) and backward from the saved out and lse
  (:mod:`semfid.backends.sdpa_backward`: on CUDA once self-checked, else by recomputing).

``attend(q, k, v, bias, scale) -> (out, lse)``:
    q [B, H, N, D], k [B, H, M, D], v [B, H, M, W], bias [B, H, M] (acc dtype) or None.
    out [B, H, N, W] (q.dtype or the accumulation dtype) = softmax(q kᵀ·scale + bias) v, 0 on rows
    whose keys are all -inf; lse [B, H, N] acc, +inf on those rows. M = 0 is such a row everywhere.
``attend_backward(q, k, vv, bias, scale, out, lse, dout) -> (dq, dk, dvv)`` in the accumulation
    dtype or q's: the attention backward of ``out = P vv`` with the given ``out`` / ``lse``
    (``rowsum(dout ⊙ out)`` is the softmax backward's row term, so augmented values work: see
    :mod:`semfid.backends.joint`). Rows with lse = +inf must have dout = 0.
``attend_backward_delta(q, k, v, bias, scale, out, lse, dout, extra)``: the same with ``extra``
    [B, H, N] added to that row term (how joint drops the maps' value columns), or None where the
    implementation declines (then joint widens the values).
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

from .._inputs import accumulation_dtype
from .sdpa import attend as sdpa_attend
from .sdpa_backward import cpu_backward, cpu_backward_delta, saved_backward

Tensor = torch.Tensor
Result = Tuple[Tensor, Tensor]

#: Keys per block and elements per logit block of :class:`Blocked` (fp32: 2 MiB).
KEY_BLOCK = 1024
BLOCK_ELEMENTS = 1 << 19
_MIN_ROWS = 16


def _blocks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _empty_keys(q: Tensor, width: int) -> Result:
    B, H, N, _ = q.shape
    acc = accumulation_dtype(q.dtype)
    return q.new_zeros(B, H, N, width, dtype=acc), q.new_full((B, H, N), float("inf"), dtype=acc)


class Blocked:
    """Query × key blocks with the online softmax, in the accumulation dtype (module docstring)."""

    @staticmethod
    def _sizes(q: Tensor, k: Tensor) -> Tuple[int, int]:
        B, H, _, _ = q.shape
        cols = max(1, min(k.shape[2], KEY_BLOCK))
        return max(_MIN_ROWS, BLOCK_ELEMENTS // max(1, B * H * cols)), cols

    @staticmethod
    def attend(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float) -> Result:
        if k.shape[2] == 0:
            return _empty_keys(q, v.shape[-1])
        acc = accumulation_dtype(q.dtype)
        B, H, N, _ = q.shape
        out = q.new_empty(B, H, N, v.shape[-1], dtype=acc)
        lse = q.new_empty(B, H, N, dtype=acc)
        rows_per, cols_per = Blocked._sizes(q, k)
        for rows in _blocks(N, rows_per):
            qc = q[:, :, rows].to(acc) * scale
            m = l = o = None
            for cols in _blocks(k.shape[2], cols_per):
                s = torch.matmul(qc, k[:, :, cols].to(acc).transpose(-1, -2))
                if bias is not None:
                    s += bias[:, :, None, cols]
                m_new = s.amax(dim=-1) if m is None else torch.maximum(m, s.amax(dim=-1))
                m_safe = m_new.masked_fill(torch.isneginf(m_new), 0.0)  # all -inf so far: p = 0
                p = torch.exp(s - m_safe[..., None])
                pv = torch.matmul(p, v[:, :, cols].to(acc))
                if m is None:
                    l, o = p.sum(dim=-1), pv
                else:
                    alpha = torch.exp(m - m_safe)
                    l = l * alpha + p.sum(dim=-1)
                    o = o * alpha[..., None] + pv
                m = m_new
            dead = l == 0
            out[:, :, rows] = (o / l[..., None]).masked_fill(dead[..., None], 0.0)
            lse[:, :, rows] = (m.masked_fill(torch.isneginf(m), 0.0) + torch.log(l)).masked_fill(
                dead, float("inf"))
        return out, lse

    @staticmethod
    def attend_backward(q: Tensor, k: Tensor, vv: Tensor, bias: Optional[Tensor], scale: float,
                        out: Tensor, lse: Tensor, dout: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return Blocked.attend_backward_delta(q, k, vv, bias, scale, out, lse, dout, None)

    @staticmethod
    def attend_backward_delta(q: Tensor, k: Tensor, vv: Tensor, bias: Optional[Tensor], scale: float,
                              out: Tensor, lse: Tensor, dout: Tensor, extra: Optional[Tensor]
                              ) -> Tuple[Tensor, Tensor, Tensor]:
        acc = accumulation_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dvv = torch.zeros(vv.shape, dtype=acc, device=q.device)
        if k.shape[2] == 0:
            return dq, dk, dvv
        delta = (dout.to(acc) * out.to(acc)).sum(dim=-1)  # rowsum(P ⊙ dP)
        if extra is not None:
            delta = delta + extra.to(acc)
        rows_per, cols_per = Blocked._sizes(q, k)
        for rows in _blocks(q.shape[2], rows_per):
            qc = q[:, :, rows].to(acc) * scale
            do_c = dout[:, :, rows].to(acc)
            lse_c, delta_c = lse[:, :, rows, None], delta[:, :, rows, None]
            for cols in _blocks(k.shape[2], cols_per):
                kc, vc = k[:, :, cols].to(acc), vv[:, :, cols].to(acc)
                s = torch.matmul(qc, kc.transpose(-1, -2))
                if bias is not None:
                    s += bias[:, :, None, cols]
                p = torch.exp(s - lse_c)
                ds = p * (torch.matmul(do_c, vc.transpose(-1, -2)) - delta_c)
                dq[:, :, rows] += torch.matmul(ds, kc)
                dk[:, :, cols] += torch.matmul(ds.transpose(-1, -2), qc)
                dvv[:, :, cols] += torch.matmul(p.transpose(-1, -2), do_c)
        return dq.mul_(scale), dk, dvv  # qc carried the scale: dk is whole


def fused_attend(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float) -> Result:
    """``attend`` through PyTorch's fused kernel of the device (:func:`semfid.backends.sdpa.attend`)."""
    if k.shape[2] == 0:
        return _empty_keys(q, v.shape[-1])
    return sdpa_attend(q, k, v, bias, scale)


class FusedCpu:
    """PyTorch's fused CPU flash-attention forward and backward (module docstring)."""

    attend = staticmethod(fused_attend)

    @staticmethod
    def attend_backward(q: Tensor, k: Tensor, vv: Tensor, bias: Optional[Tensor], scale: float,
                        out: Tensor, lse: Tensor, dout: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        if k.shape[2] == 0 or q.shape[2] == 0:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(vv)
        return cpu_backward(q, k, vv, bias, scale, out, lse, dout)


    @staticmethod
    def attend_backward_delta(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float,
                              out: Tensor, lse: Tensor, dout: Tensor, extra: Tensor
                              ) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
        if k.shape[2] == 0 or q.shape[2] == 0:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        return cpu_backward_delta(q, k, v, bias, scale, out, lse, dout, extra)


class SdpaFused:
    """The ``sdpa`` backend's forward; backward by PyTorch's fused kernels from the saved out and
    lse (:func:`semfid.backends.sdpa_backward.saved_backward`). No ``attend_backward_delta``: the
    backward always widens the values (the augmented-value identity), on CPU as on CUDA, so the
    CPU tests run the math a GPU runs."""

    attend = staticmethod(fused_attend)
    attend_backward = staticmethod(saved_backward)


__all__ = ["Blocked", "FusedCpu", "SdpaFused"]
