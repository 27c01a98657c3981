"""The ``sdpa`` backend's attention backward: PyTorch's own fused backward kernels fed the saved
out and lse, so nothing of the forward is recomputed; the recompute stays as the fallback.

``saved_backward(q, k, vv, bias, scale, out, lse, dout) -> (dq, dk, dvv)``, shapes as in
:mod:`semfid.backends.primitives`: q [B, H, N, D], k [B, H, M, D], vv [B, H, M, W] (augmented
values), bias [B, H, M] or None, out [B, H, N, W] (out' = P vv), lse [B, H, N] (accumulation
dtype, +inf on rows whose keys are all -inf), dout [B, H, N, W] (dO' = [dO, G]). It runs:

* CPU: ``aten::_scaled_dot_product_flash_attention_for_cpu_backward`` (PyTorch's fused CPU flash
  backward; q and k padded to the value width as the forward pads them, :mod:`semfid.backends.sdpa`).
* CUDA, fp16 / bf16 / fp32: ``aten::_scaled_dot_product_efficient_attention_backward`` (the
  memory-efficient kernel whose forward :func:`semfid.backends.sdpa.attend` runs), only after a
  one-time self-check on that device and dtype (:func:`self_check`: a tiny random problem with a
  -inf key whose gradients must match the recompute's). The verdict is cached in ``VERDICTS``
  (``None``: passed; otherwise the reason) and a failed check falls back to the recompute with
  one warning. On an H200 (torch 2.11, 2026-12-04) the check passed in fp16 and bf16 once ``out``
  went in the kernel's [B, N, H, W] memory (:func:`_bnhw`); the CPU tests fake the verdict.
* anything else (CUDA float64, other devices, a failed check): :func:`recompute_backward`, the
  forward recomputed under autograd and PyTorch's backward of it.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

from .sdpa import _efficient_bias, _mask, _pad_last, _padded_widths, _round_up, attend
from .sdpa import autograd_inside_op

Tensor = torch.Tensor
Grads = Tuple[Tensor, Tensor, Tensor]
Backward = Callable[..., Grads]

#: (device, dtype) -> None when the CUDA saved-lse backward passed its self-check there, else why not.
VERDICTS: Dict[Tuple[str, torch.dtype], Optional[str]] = {}
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def cpu_backward(q: Tensor, k: Tensor, vv: Tensor, bias: Optional[Tensor], scale: float,
                 out: Tensor, lse: Tensor, dout: Tensor) -> Grads:
    """PyTorch's fused CPU flash-attention backward from the saved out and lse."""
    width = vv.shape[-1]
    wq, wv = _padded_widths("cpu", q.shape[-1], width)
    mask, _ = _mask(bias, q.dtype)  # dead rows: bias 0 there, lse +inf makes P = 0
    dt = q.dtype
    lse_k = lse.to(torch.float64 if dt == torch.float64 else torch.float32).contiguous()
    dq, dk, dvv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        _pad_last(dout.to(dt), wv).contiguous(), _pad_last(q, wq), _pad_last(k, wq),
        _pad_last(vv.to(dt), wv), _pad_last(out.to(dt), wv).contiguous(), lse_k, 0.0, False,
        attn_mask=mask, scale=scale)
    return dq[..., : q.shape[-1]], dk[..., : k.shape[-1]], dvv[..., :width]


def cpu_backward_delta(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float,
                       out: Tensor, lse: Tensor, dout: Tensor, extra: Tensor) -> Optional[Grads]:
    """:func:`cpu_backward` with ``extra`` [B, H, N] added to the softmax backward's row term
    ``rowsum(dout ⊙ out)``: the fused kernel reads ``out`` for that term only, so ``out`` is
    passed with ``extra_i / dout[i, m_i]`` added at each row's largest |dout| entry m_i (the
    product's rounding error stays at eps·(|dout·out| + |extra|)). None when a row with
    ``extra != 0`` has ``dout = 0`` (the caller then widens the values instead)."""
    dt = q.dtype
    d = dout.to(dt)
    pivot_at = d.abs().argmax(dim=-1, keepdim=True)
    pivot = d.gather(-1, pivot_at)
    zero = pivot == 0
    if bool((zero & (extra[..., None] != 0)).any()):
        return None
    shift = (extra[..., None] / pivot.masked_fill(zero, 1.0).to(extra.dtype)).to(dt)
    out_mod = out.to(dt, memory_format=torch.contiguous_format, copy=True)
    out_mod.scatter_add_(-1, pivot_at, shift)
    return cpu_backward(q, k, v, bias, scale, out_mod, lse, d)


def _bnhw(t: Tensor, width: int) -> Tensor:
    """t [B, H, N, w] with zero columns appended to ``width``, in [B, N, H, width] memory: the
    memory-efficient backward reads ``out`` at a row stride of H * width whatever its strides (the
    layout its forward writes), so an [B, H, N, W]-contiguous out gave garbage (seen on an H200).
    No copy when ``t`` is the forward's own unpadded out, which has that memory already."""
    return _pad_last(t.transpose(1, 2), width).contiguous().transpose(1, 2)


def cuda_backward(q: Tensor, k: Tensor, vv: Tensor, bias: Optional[Tensor], scale: float,
                  out: Tensor, lse: Tensor, dout: Tensor) -> Grads:
    """PyTorch's memory-efficient CUDA backward from the saved out and lse (gated by
    :func:`self_check`, which passed on an H200)."""
    width, dt = vv.shape[-1], q.dtype
    B, H, N, _ = q.shape
    wq, wv = _padded_widths("cuda", q.shape[-1], width)
    mask, _ = _mask(bias, dt)
    # lse as the kernel's own forward returns it: fp32, rows padded to a multiple of 32
    lse_p = lse.new_zeros(B, H, _round_up(N, 32), dtype=torch.float32)
    lse_p[..., :N] = lse
    no_dropout = torch.zeros((), dtype=torch.int64, device=q.device)  # philox seed / offset: unused
    dq, dk, dvv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        _pad_last(dout.to(dt), wv).contiguous(), _pad_last(q, wq), _pad_last(k, wq),
        _pad_last(vv.to(dt), wv), _efficient_bias(mask, N), _bnhw(out.to(dt), wv),
        lse_p, no_dropout, no_dropout, 0.0, [True, True, True, False], False, scale=scale)
    return dq[..., : q.shape[-1]], dk[..., : k.shape[-1]], dvv[..., :width]


def recompute_backward(q: Tensor, k: Tensor, vv: Tensor, bias: Optional[Tensor], scale: float,
                       out: Tensor, lse: Tensor, dout: Tensor) -> Grads:
    """The forward recomputed under autograd, PyTorch's backward of it (``out`` / ``lse`` unused)."""
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, vv))
    with autograd_inside_op():
        o, _ = attend(qg, kg, vg, bias, scale)
    return torch.autograd.grad([o], [qg, kg, vg], [dout.to(o.dtype)], allow_unused=True)


def self_check(device: torch.device, dtype: torch.dtype,
               backward: Backward = cuda_backward) -> Optional[str]:
    """None when ``backward`` gives the recompute's gradients on a tiny random problem (odd
    sizes, value width != head dim, one -inf key, q and k in diffusers' [B, N, H, D] memory as
    the processors hand them over) on ``device`` / ``dtype``; else the reason."""
    gen = torch.Generator().manual_seed(0)
    B, H, N, M, D, W = 1, 2, 37, 45, 24, 29
    q, k = (torch.randn(B, n, H, D, generator=gen).to(device, dtype).transpose(1, 2) for n in (N, M))
    vv, dout = (torch.randn(*s, generator=gen).to(device, dtype) for s in ((B, H, M, W), (B, H, N, W)))
    bias = torch.zeros(B, H, M, device=device)
    bias[..., -3] = float("-inf")
    try:
        out, lse = attend(q, k, vv, bias, D ** -0.5)
        got = backward(q, k, vv, bias, D ** -0.5, out, lse, dout)
        want = recompute_backward(q, k, vv, bias, D ** -0.5, out, lse, dout)
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as exc:
        return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
    # Same kernel, same out and lse: the two differ by accumulation order at most.
    rtol = max(4 * torch.finfo(dtype).eps, 1e-5)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        err = float((g.double() - w.double()).abs().max())
        tol = rtol * max(1.0, float(w.double().abs().max()))
        if g.shape != w.shape or not err <= tol:
            return f"{name} differs from the recompute's by {err:.3g} (tolerance {tol:.3g})"
    return None


def uses_saved_lse(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`saved_backward` runs a saved-lse kernel on ``device`` / ``dtype``: always on
    CPU; on CUDA once :func:`self_check` passed there (run once, cached in ``VERDICTS``)."""
    if device.type == "cpu":
        return True
    if device.type != "cuda" or dtype not in _CUDA_DTYPES:
        return False
    key = (str(device), dtype)
    if key not in VERDICTS:
        VERDICTS[key] = reason = self_check(device, dtype)
        if reason is not None:
            warnings.warn(f"semfid sdpa backend: PyTorch's saved-lse attention backward failed its "
                          f"self-check on {device} {dtype} ({reason}); backward recomputes the "
                          "forward there", stacklevel=2)
    return VERDICTS[key] is None


def backward_kernel(device: torch.device, dtype: torch.dtype) -> Backward:
    """The backward :func:`saved_backward` runs on ``device`` / ``dtype`` (module docstring)."""
    if not uses_saved_lse(device, dtype):
        return recompute_backward
    return cpu_backward if device.type == "cpu" else cuda_backward


def saved_backward(q: Tensor, k: Tensor, vv: Tensor, bias: Optional[Tensor], scale: float,
                   out: Tensor, lse: Tensor, dout: Tensor) -> Grads:
    """The attention backward of ``out = P vv`` (module docstring), zeros when N or M is 0."""
    if k.shape[2] == 0 or q.shape[2] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(vv)
    return backward_kernel(q.device, q.dtype)(q, k, vv, bias, scale, out, lse, dout)


__all__ = ["VERDICTS", "backward_kernel", "cpu_backward", "cpu_backward_delta", "cuda_backward",
           "recompute_backward", "saved_backward", "self_check", "uses_saved_lse"]
