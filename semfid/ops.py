"""Public functional API: fused cross-attention with selected maps, and the subject-wise loss.

Both ops reduce to one library op, ``semfid::xattn_fwd`` / ``semfid::xattn_bwd`` (registered with
``torch.library.custom_op`` so ``torch.compile`` and ``torch.library.opcheck`` see through them).
The backend is chosen in Python before the op runs and travels into it as a string, so the
backward always runs on the backend that ran the forward.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple, Union

import torch

from ._inputs import SelectLike, XattnInputs
from .backends import get_backend, select_backend
from .backends.base import empty_forward_outputs

Tensor = torch.Tensor


# ------------------------------------------------------------------------------------------------
# torch.library ops
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("semfid::xattn_fwd", mutates_args=())
def _xattn_fwd(
    q: Tensor,
    k: Tensor,
    v: Optional[Tensor],
    bias: Optional[Tensor],
    select: Optional[Tensor],
    scale: float,
    mean_heads: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(out, lse, maps) of one fused pass; shapes in :mod:`semfid.backends.base`."""
    return get_backend(backend).forward(q, k, v, bias, select, scale, mean_heads)


@_xattn_fwd.register_fake
def _xattn_fwd_fake(q, k, v, bias, select, scale, mean_heads, backend):
    return empty_forward_outputs(q, k, v, select, mean_heads)


@torch.library.custom_op("semfid::xattn_bwd", mutates_args=())
def _xattn_bwd(
    q: Tensor,
    k: Tensor,
    v: Optional[Tensor],
    bias: Optional[Tensor],
    select: Optional[Tensor],
    scale: float,
    mean_heads: bool,
    out: Tensor,
    lse: Tensor,
    dout: Optional[Tensor],
    dmaps: Optional[Tensor],
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of one fused pass (dv is empty when v is None)."""
    return get_backend(backend).backward(
        q, k, v, bias, select, scale, mean_heads, out, lse, dout, dmaps
    )


@_xattn_bwd.register_fake
def _xattn_bwd_fake(q, k, v, bias, select, scale, mean_heads, out, lse, dout, dmaps, backend):
    dv = torch.empty_like(v) if v is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), dv


def _setup_context(ctx, inputs, output):
    q, k, v, bias, select, scale, mean_heads, backend = inputs
    out, lse, _ = output
    ctx.save_for_backward(q, k, v, bias, select, out, lse)
    ctx.scale, ctx.mean_heads, ctx.backend = scale, mean_heads, backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse, dmaps):
    q, k, v, bias, select, out, lse = ctx.saved_tensors
    if v is None:
        dout = None
    if select is None:
        dmaps = None
    dq, dk, dv = _xattn_bwd(
        q, k, v, bias, select, ctx.scale, ctx.mean_heads, out, lse, dout, dmaps, ctx.backend
    )
    return dq, dk, (dv if v is not None else None), None, None, None, None, None


_xattn_fwd.register_autograd(_backward, setup_context=_setup_context)


def _run(inp: XattnInputs, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    impl = select_backend(inp, backend)
    return _xattn_fwd(inp.q, inp.k, inp.v, inp.bias, inp.select, inp.scale, inp.mean_heads, impl.NAME)


# ------------------------------------------------------------------------------------------------
# public functions
# ------------------------------------------------------------------------------------------------
def cross_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: Optional[float] = None,
    attn_bias: Optional[Tensor] = None,
    select: SelectLike = None,
    head_reduce: str = "mean",
    backend: str = "auto",
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    r"""Fused attention ``out = softmax(q kᵀ · scale + attn_bias) v``, optionally with map columns.

    Args:
        q (`Tensor` [B, H, N, D]): queries (float16, bfloat16, float32 or float64; any strides).
        k (`Tensor` [B, H, M, D]): keys, same dtype and device as ``q``.
        v (`Tensor` [B, H, M, Dv]): values.
        scale (`float`, *optional*, defaults to ``D ** -0.5``): logit scale.
        attn_bias (`Tensor`, *optional*): additive per-key bias, [B, M], [B, 1, M], [B, 1, 1, M] or
            [B, H, 1, M]; ``-inf`` or ``-10000`` masks a key. A row whose keys are all ``-inf`` gives
            zeros. Not differentiable.
        select (`Tensor` / `list[int]`, *optional*): key indices [S] (shared by the batch) or
            [B, S]; duplicates allowed. When given, the selected probability columns are returned.
        head_reduce (`str`, *optional*, defaults to ``"mean"``): ``"mean"`` averages the maps over
            heads, ``"none"`` keeps them per head.
        backend (`str`, *optional*, defaults to ``"auto"``): ``"auto"``, ``"torch"``, ``"triton"`` or
            ``"cuda"`` (see ``python -m semfid.info``).

    Returns:
        ``out`` [B, H, N, Dv] in the dtype of ``q`` when ``select`` is None, else ``(out, maps)``
        with ``maps = P[..., select]`` as [B, N, S] (``"mean"``) or [B, H, N, S] (``"none"``), in
        float32 (float64 for float64 inputs). Both are differentiable w.r.t. q, k and v.
    """
    if v is None:
        raise TypeError("v must be a torch.Tensor [B, H, M, Dv], got None")
    inp = XattnInputs.validate(q, k, v, scale=scale, attn_bias=attn_bias, select=select,
                               head_reduce=head_reduce)
    out, _, maps = _run(inp, backend)
    return out if select is None else (out, maps)


def subject_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_ref: Tensor,
    *,
    tokens: SelectLike,
    ref_tokens: SelectLike = None,
    scale: Optional[float] = None,
    attn_bias: Optional[Tensor] = None,
    ref_attn_bias: Optional[Tensor] = None,
    head_reduce: str = "mean",
    detach_reference: bool = True,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    r"""Cross-attention output plus the subject-wise attention loss against reference keys.

    ``A_t = softmax(q kᵀ·s + attn_bias)[..., tokens]`` and ``A_r = softmax(q k_refᵀ·s +
    ref_attn_bias)[..., ref_tokens]``, both reduced over heads by ``head_reduce``;
    ``loss[b] = mean((A_t − A_r)²)`` over every non-batch dim. The same ``q`` is used for both
    (SeFi-IDE's subject-wise attention loss).

    Args:
        q, k, v: as in :func:`cross_attention`.
        k_ref (`Tensor` [B, H, M_ref, D]): keys of the reference prompt.
        tokens (`Tensor` / `list[int]`): [S] or [B, S] target-prompt token indices.
        ref_tokens (`Tensor` / `list[int]`, *optional*, defaults to ``tokens``): [S] or [B, S]
            reference-prompt token indices, as many per row as ``tokens``.
        scale, attn_bias, head_reduce, backend: as in :func:`cross_attention`.
        ref_attn_bias (`Tensor`, *optional*): additive per-key bias for ``k_ref``. Not differentiable.
        detach_reference (`bool`, *optional*, defaults to ``True``): when True no gradient flows
            through ``A_r`` (neither to ``k_ref`` nor to ``q``); ``q`` still gets the ``A_t`` path.

    Returns:
        ``(out, loss)``: ``out`` [B, H, N, Dv] exactly as :func:`cross_attention`, ``loss`` [B] in
        float32 (float64 for float64 inputs).
    """
    if tokens is None:
        raise ValueError("tokens must give the target-prompt token indices ([S] or [B, S]), got None")
    if not isinstance(detach_reference, bool):
        raise TypeError(f"detach_reference must be a bool, got {type(detach_reference).__name__}")
    if v is None:
        raise TypeError("v must be a torch.Tensor [B, H, M, Dv], got None")
    target = XattnInputs.validate(q, k, v, scale=scale, attn_bias=attn_bias, select=tokens,
                                  head_reduce=head_reduce, names=("q", "k", "v", "attn_bias", "tokens"))
    reference = XattnInputs.validate(
        q, k_ref, None, scale=target.scale, attn_bias=ref_attn_bias,
        select=tokens if ref_tokens is None else ref_tokens, head_reduce=head_reduce,
        names=("q", "k_ref", "v", "ref_attn_bias", "ref_tokens"),
    )
    if reference.num_selected != target.num_selected:
        raise ValueError(
            f"ref_tokens must select as many tokens as tokens ({target.num_selected}), "
            f"got {reference.num_selected}"
        )
    out, _, maps_t = _run(target, backend)
    with torch.no_grad() if detach_reference else contextlib.nullcontext():
        _, _, maps_r = _run(reference, backend)
    loss = (maps_t - maps_r).square().flatten(1).mean(dim=1)
    return out, loss


def attention_maps(
    q: Tensor,
    k: Tensor,
    *,
    select: SelectLike,
    scale: Optional[float] = None,
    attn_bias: Optional[Tensor] = None,
    head_reduce: str = "mean",
    backend: str = "auto",
) -> Tensor:
    r"""Only the selected probability columns ``softmax(q kᵀ · scale + attn_bias)[..., select]``.

    A maps-only pass (no values, no output): what the reference branch of
    :func:`subject_attention` computes. Same arguments and map layout as :func:`cross_attention`;
    differentiable w.r.t. q and k.
    """
    if select is None:
        raise ValueError("select must give key indices ([S] or [B, S]), got None")
    inp = XattnInputs.validate(q, k, None, scale=scale, attn_bias=attn_bias, select=select,
                               head_reduce=head_reduce)
    return _run(inp, backend)[2]


__all__ = ["cross_attention", "subject_attention", "attention_maps"]
