"""The math of the ``sdpa`` backend (:mod:`semfid.backends.sdpa_backend`): semfid's ops built only
from PyTorch's own fused attention kernels.

The augmented-value identity (DESIGN.md §2): append one-hot columns ``E_sel`` [M, S] for the
selected keys to the values, and one attention call returns the output and the selected
probability columns of every head::

    SDPA(q, k, [V, E_sel]) = [P V, P E_sel] = [out, P[..., sel]]

Its backward with ``dO' = [dO, G]`` is the fused backward of out and the maps, because
``dO' V'ᵀ = dO Vᵀ + scatter(G) = dP`` and ``rowsum(dO' ⊙ O') = rowsum(P ⊙ dP)``. A head-mean map
gradient becomes ``G / H`` on every head. The reference maps of the subject loss are
``SDPA(q, k_ref, E_sel_ref)``.

Forward and backward are PyTorch's own kernels (the fused CPU flash kernel; the memory-efficient
kernel on CUDA). The forward is here; the backward (:mod:`semfid.backends.sdpa_backward`, through
:mod:`semfid.backends.joint`) feeds PyTorch's fused backward kernel the saved out and lse with
``dO' = [dO, G]`` (the maps ``A`` of out' rebuilt from lse), so nothing is recomputed; on CUDA only
after a one-time self-check on that device (else the forward is recomputed under autograd).
Nothing beyond the op's own inputs, out and lse is kept between forward and backward. Padding:

* CPU: PyTorch's fused kernel needs equal q/k/v head dims, so q and k are padded with zeros to the
  augmented value width (or the values to the head dim). Zero columns leave the logits unchanged;
  the scale is passed explicitly.
* CUDA: head dims are padded to multiples of 8 (the fused kernels' alignment).

Rows whose keys are all ``-inf`` (a [B, H] property: the bias does not depend on the query) give
NaN in SDPA; their bias is replaced by 0 and their outputs multiplied by 0, so P = 0, out = 0,
lse = +inf and zero gradients, as the contract says.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

from .._inputs import accumulation_dtype
from .base import may_hold_nan, nan_rows

Tensor = torch.Tensor

# Set to False (tests do) to run the public-API path: F.scaled_dot_product_attention for the
# output and a chunked logsumexp for lse. Also taken, with one warning, if a private op refuses.
USE_LSE_KERNELS = True
_WARNED_FALLBACK: set = set()
_LSE_CHUNK_ELEMENTS = 1 << 21


# ------------------------------------------------------------------------------------------------
# one attention call: out' and lse
# ------------------------------------------------------------------------------------------------
def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_last(t: Tensor, width: int) -> Tensor:
    """t with zero columns appended to ``width`` (one copy: F.pad fills the whole result first)."""
    if t.shape[-1] == width:
        return t
    padded = t.new_empty(*t.shape[:-1], width)
    padded[..., : t.shape[-1]].copy_(t)
    padded[..., t.shape[-1]:].zero_()
    return padded


def _padded_widths(device_type: str, head_dim: int, value_dim: int) -> Tuple[int, int]:
    """(q/k width, value width) the fused kernels accept on this device type."""
    if device_type == "cpu":
        width = max(head_dim, value_dim)
        return width, width
    return _round_up(head_dim, 8), _round_up(value_dim, 8)


def _mask(bias: Optional[Tensor], dtype: torch.dtype) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """SDPA attn_mask [B, H, 1, M] in ``dtype`` with dead rows un-masked, and the [B, H, 1, 1]
    0/1 keep factor (None when no (batch, head) pair has all keys -inf)."""
    if bias is None:
        return None, None
    dead = torch.isneginf(bias).all(dim=-1)  # [B, H]
    # One host sync on CPU skips the fix-up when no row is dead; on CUDA it is always applied.
    if bias.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(dead.any()):
        return bias[:, :, None, :].to(dtype), None
    mask = bias.masked_fill(dead[..., None], 0.0)[:, :, None, :].to(dtype)
    keep = (~dead)[..., None, None].to(dtype)
    return mask, keep


def _efficient_bias(mask: Optional[Tensor], num_queries: int) -> Optional[Tensor]:
    """The memory-efficient CUDA kernel's bias [B, H, N, M] from mask [B, H, 1, M]: rows padded
    to 16 elements in memory, as PyTorch's own SDPA dispatch does, expanded over the queries."""
    if mask is None:
        return None
    M = mask.shape[-1]
    padded = mask.new_zeros(*mask.shape[:-1], _round_up(M, 16))
    padded[..., :M] = mask
    return padded[..., :M].expand(-1, -1, num_queries, -1)


def _chunked_lse(q: Tensor, k: Tensor, mask: Optional[Tensor], scale: float) -> Tensor:
    """logsumexp of q kᵀ·scale + mask over the keys, [B, H, N] in the accumulation dtype."""
    acc = accumulation_dtype(q.dtype)
    B, H, N, _ = q.shape
    rows = max(1, _LSE_CHUNK_ELEMENTS // max(1, B * H * k.shape[2]))
    kt = k.to(acc).transpose(-1, -2) * scale
    parts = []
    for start in range(0, N, rows):
        s = torch.matmul(q[:, :, start:start + rows].to(acc), kt)
        if mask is not None:
            s = s + mask.to(acc)
        parts.append(torch.logsumexp(s, dim=-1))
    return torch.cat(parts, dim=-1)


def _fused_with_lse(q: Tensor, k: Tensor, vv: Tensor, mask: Optional[Tensor],
                    scale: float) -> Tuple[Tensor, Tensor]:
    """(out [B, H, N, Wv], lse [B, H, N]) from one of PyTorch's fused kernels (autograd-capable)."""
    if USE_LSE_KERNELS:
        key = (q.device.type, q.dtype)
        try:
            if q.device.type == "cpu":
                return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q, k, vv, attn_mask=mask, scale=scale)
            if q.device.type == "cuda" and q.dtype != torch.float64:
                out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                    q, k, vv, _efficient_bias(mask, q.shape[2]), True, 0.0, False, scale=scale)[:2]
                return out, lse[..., : q.shape[2]]
        except (RuntimeError, NotImplementedError) as exc:
            if key not in _WARNED_FALLBACK:
                _WARNED_FALLBACK.add(key)
                warnings.warn(f"semfid sdpa backend: PyTorch's lse-returning kernel refused "
                              f"({str(exc).splitlines()[0]}); using F.scaled_dot_product_attention "
                              "and a separate logsumexp", stacklevel=3)
    out = F.scaled_dot_product_attention(q, k, vv, attn_mask=mask, scale=scale)
    with torch.no_grad():
        lse = _chunked_lse(q, k, mask, scale)
    return out, lse


def attend(q: Tensor, k: Tensor, vv: Tensor, bias: Optional[Tensor],
           scale: float) -> Tuple[Tensor, Tensor]:
    """One fused attention call ``softmax(q kᵀ·scale + bias) vv``, padded as the device needs.

    Args: q [B, H, N, D], k [B, H, M, D], vv [B, H, M, W] (the augmented values), bias [B, H, M]
    fp32 or None. Returns (out' [B, H, N, W] in q.dtype, lse [B, H, N] in the accumulation dtype,
    +inf on rows whose keys are all -inf). Differentiable w.r.t. q, k and vv.
    """
    width = vv.shape[-1]
    if q.numel() == 0:  # no query rows: PyTorch's fused CPU kernel divides by zero there (SIGFPE)
        B, H, N, _ = q.shape
        return (q.new_zeros(B, H, N, width) + vv.sum() * 0,  # still a function of vv for autograd
                q.new_zeros(B, H, N, dtype=accumulation_dtype(q.dtype)))
    wq, wv = _padded_widths(q.device.type, q.shape[-1], width)
    mask, keep = _mask(bias, q.dtype)
    out, lse = _fused_with_lse(_pad_last(q, wq), _pad_last(k, wq), _pad_last(vv, wv), mask, scale)
    out, lse = out[..., :width], lse.to(accumulation_dtype(q.dtype)).contiguous()
    if keep is not None:
        out = out * keep
        lse = lse.masked_fill(keep[..., 0] == 0, float("inf"))
    if q.device.type == "cpu" and may_hold_nan(q, k):  # the fused CPU kernel zeroes NaN rows:
        bad = nan_rows(q, k)                            # keep them NaN
        # in place on the kernel's fresh output, unless autograd records (the recompute fallback)
        nan = float("nan")
        out = out.masked_fill(bad, nan) if out.requires_grad else out.masked_fill_(bad, nan)
        lse = lse.masked_fill(bad[..., 0], float("nan"))
    return out, lse


# ------------------------------------------------------------------------------------------------
# helpers shared by both ops
# ------------------------------------------------------------------------------------------------
def one_hot_columns(select: Tensor, num_keys: int, heads: int, dtype: torch.dtype) -> Tensor:
    """E_sel [B, H, M, S] with E[b, :, select[b, s], s] = 1 (duplicates give identical columns)."""
    B, S = select.shape
    e = torch.zeros(B, num_keys, S, dtype=dtype, device=select.device)
    e.scatter_(1, select[:, None, :], 1.0)
    return e[:, None].expand(B, heads, num_keys, S)


def augmented_values(v: Optional[Tensor], select: Optional[Tensor], k: Tensor) -> Tensor:
    """[V, E_sel] (or V, or E_sel alone for a maps-only pass), [B, H, M, Dv + S]."""
    parts = [] if v is None else [v]
    if select is not None:
        parts.append(one_hot_columns(select, k.shape[2], k.shape[1], k.dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def out_layout(o: Tensor) -> Tensor:
    """Copy [B, H, N, Dv] into the contract's layout: [B, N, H, Dv] memory, seen as [B, H, N, Dv]."""
    B, H, N, Dv = o.shape
    return torch.empty(B, N, H, Dv, dtype=o.dtype, device=o.device).transpose(1, 2).copy_(o)


def like(t: Tensor, grad: Optional[Tensor]) -> Tensor:
    """``grad`` with the input's dtype and strides (``empty_like(t)``), zeros when None: returned
    as is when it has them already (PyTorch's fused CPU backward writes diffusers' layout), else
    copied."""
    if grad is None:
        return torch.zeros_like(t)
    if grad.dtype == t.dtype and grad.shape == t.shape and grad.stride() == t.stride():
        return grad
    return torch.empty_like(t).copy_(grad)


def head_reduce(a: Tensor, mean_heads: bool) -> Tensor:
    """Per-head maps [B, H, N, S] in the accumulation dtype, averaged over heads if asked."""
    a = a.to(accumulation_dtype(a.dtype))
    return a.mean(dim=1) if mean_heads else a.contiguous()


def per_head_grad(g: Tensor, heads: int, mean_heads: bool, dtype: torch.dtype) -> Tensor:
    """Map gradient [B, N, S] (head mean: G / H on every head) or [B, H, N, S], in ``dtype``."""
    if mean_heads:
        g = (g / heads)[:, None].expand(-1, heads, -1, -1)
    return g.to(dtype)


@contextlib.contextmanager
def autograd_inside_op() -> Iterator[None]:
    """Record autograd inside a ``torch.library.custom_op`` kernel.

    A custom op's kernel runs below the Autograd dispatch key (it is in the thread's exclude set),
    so ``torch.enable_grad()`` alone records nothing there. The backward re-enables the key for
    the recomputed forward, restoring the thread's dispatch sets on exit.
    """
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set()
    exclude = exclude.remove(torch._C.DispatchKey.AutogradFunctionality)
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        yield


# ------------------------------------------------------------------------------------------------
# cross_attention / attention_maps: xattn_fwd
# ------------------------------------------------------------------------------------------------
def xattn_forward(q: Tensor, k: Tensor, v: Optional[Tensor], bias: Optional[Tensor],
                  select: Optional[Tensor], scale: float, mean_heads: bool
                  ) -> Tuple[Tensor, Tensor, Tensor]:
    """(out, lse, maps) of the xattn contract (:mod:`semfid.backends.base`) in one SDPA call."""
    acc = accumulation_dtype(q.dtype)
    with torch.no_grad():
        o, lse = attend(q, k, augmented_values(v, select, k), bias, scale)
    dv = 0 if v is None else v.shape[-1]
    out = q.new_empty(0) if v is None else out_layout(o[..., :dv])
    maps = q.new_empty(0, dtype=acc) if select is None else head_reduce(o[..., dv:], mean_heads)
    return out, lse, maps


# ------------------------------------------------------------------------------------------------
# subject_attention: subject_fwd (CONTRACT.md)
# ------------------------------------------------------------------------------------------------
def _column_weights(weights: Optional[Tensor], select: Tensor, acc: torch.dtype) -> Tensor:
    """[B, S] loss weight per selected column: ``weights``, or 1/S for rectangular rows."""
    if weights is not None:
        return weights.to(acc)
    return torch.full(select.shape, 1.0 / select.shape[1], dtype=acc, device=select.device)


def _broadcast(w: Tensor, like_maps: Tensor) -> Tensor:
    """[B, S] -> broadcastable against [B, N, S] or [B, H, N, S]."""
    return w[:, None, :] if like_maps.dim() == 3 else w[:, None, None, :]


def subject_forward(q: Tensor, k: Tensor, v: Tensor, k_ref: Tensor, bias: Optional[Tensor],
                    ref_bias: Optional[Tensor], tokens: Tensor, ref_tokens: Tensor,
                    weights: Optional[Tensor], scale: float, mean_heads: bool,
                    detach_reference: bool, return_maps: bool
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, lse, lse_ref, loss, maps, diff) of CONTRACT.md: two SDPA calls, target and reference."""
    B, H, N, _ = q.shape
    acc = accumulation_dtype(q.dtype)
    with torch.no_grad():
        o, lse = attend(q, k, augmented_values(v, tokens, k), bias, scale)
        o_ref, lse_ref = attend(q, k_ref, augmented_values(None, ref_tokens, k_ref), ref_bias, scale)
    a_t = head_reduce(o[..., v.shape[-1]:], mean_heads)
    diff = a_t - head_reduce(o_ref, mean_heads)
    w = _column_weights(weights, tokens, acc)
    loss = (diff.square() * _broadcast(w, diff)).flatten(1).sum(dim=1) / (N * (1 if mean_heads else H))
    maps = a_t if return_maps else q.new_empty(0, dtype=acc)  # ragged padding: zeroed by semfid.ops
    if detach_reference and mean_heads:
        lse_ref = q.new_empty(0, dtype=acc)
    return (out_layout(o[..., : v.shape[-1]]), lse, lse_ref, loss, maps,
            diff if mean_heads else q.new_empty(0, dtype=acc))
