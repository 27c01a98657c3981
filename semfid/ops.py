"""Public functional API: fused cross-attention with selected maps, and the subject-wise loss.

Two pairs of ``torch.library`` custom ops carry the work (``torch.compile`` and
``torch.library.opcheck`` see through them; their fakes return exactly the layouts the backends
allocate, see :mod:`semfid.backends.base`):

* ``semfid::xattn_fwd`` / ``xattn_bwd`` — one pass of attention with selected map columns
  (:func:`cross_attention`, :func:`attention_maps`);
* ``semfid::subject_fwd`` / ``subject_bwd`` — target maps, reference maps, the loss and its
  gradient in one pass per direction (:func:`subject_attention`).

Inputs are validated once, in Python, and the backend is chosen there (memoised per shape class);
its name travels into the op as a string, so the backward always runs on the backend that ran the
forward. Inside the ops the flat arguments become input objects again, without re-validation.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ._inputs import SubjectInputs, TokenSelection, TokensLike, XattnInputs
from .backends import get_backend, select_backend
from .backends.base import empty_forward_outputs, empty_subject_grads, empty_subject_outputs

Tensor = torch.Tensor


# ------------------------------------------------------------------------------------------------
# semfid::xattn_fwd / xattn_bwd
# ------------------------------------------------------------------------------------------------
def _xattn_fwd_impl(
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
    return get_backend(backend).forward(XattnInputs(q, k, v, bias, select, scale, mean_heads))


_xattn_fwd = torch.library.custom_op("semfid::xattn_fwd", mutates_args=())(_xattn_fwd_impl)


@_xattn_fwd.register_fake
def _xattn_fwd_fake(q, k, v, bias, select, scale, mean_heads, backend):
    return empty_forward_outputs(q, k, v, select, mean_heads)


def _xattn_bwd_impl(
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
    inp = XattnInputs(q, k, v, bias, select, scale, mean_heads)
    return get_backend(backend).backward(inp, out, lse, dout, dmaps)


_xattn_bwd = torch.library.custom_op("semfid::xattn_bwd", mutates_args=())(_xattn_bwd_impl)


@_xattn_bwd.register_fake
def _xattn_bwd_fake(q, k, v, bias, select, scale, mean_heads, out, lse, dout, dmaps, backend):
    dv = torch.empty_like(v) if v is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), dv


def _xattn_setup_context(ctx, inputs, output):
    q, k, v, bias, select, scale, mean_heads, backend = inputs
    out, lse, _ = output
    ctx.save_for_backward(q, k, v, bias, select, out, lse)
    ctx.scale, ctx.mean_heads, ctx.backend = scale, mean_heads, backend
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)
    ctx.eager = False


def _refuse_double_backward(op: str) -> None:
    """The backward passes are not themselves differentiable: they take the saved softmax
    statistics (lse, the head-mean diff) as constants, so a graph built through them
    (``create_graph=True``) would give wrong second derivatives. Say so instead."""
    if torch.is_grad_enabled() and not _traced():
        raise RuntimeError(
            f"semfid.{op} does not support double backward (create_graph=True): its backward "
            "treats saved softmax statistics as constants, so second derivatives would be wrong. "
            "Take the first gradient without create_graph, or use the explicit-softmax reference "
            "(semfid.testing) where higher-order terms are needed."
        )


def _xattn_backward(ctx, dout, dlse, dmaps):
    q, k, v, bias, select, out, lse = ctx.saved_tensors
    dout = dout if v is not None else None
    dmaps = dmaps if select is not None else None
    if dout is None and dmaps is None:
        return (None,) * 8
    _refuse_double_backward("cross_attention / attention_maps")
    dq, dk, dv = (_xattn_bwd_impl if ctx.eager else _xattn_bwd)(
        q, k, v, bias, select, ctx.scale, ctx.mean_heads, out, lse, dout, dmaps, ctx.backend
    )
    return dq, dk, (dv if v is not None else None), None, None, None, None, None


_xattn_fwd.register_autograd(_xattn_backward, setup_context=_xattn_setup_context)


# ------------------------------------------------------------------------------------------------
# semfid::subject_fwd / subject_bwd
# ------------------------------------------------------------------------------------------------
def _subject_fwd_impl(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_ref: Tensor,
    bias: Optional[Tensor],
    ref_bias: Optional[Tensor],
    tokens: Tensor,
    ref_tokens: Tensor,
    weights: Optional[Tensor],
    scale: float,
    mean_heads: bool,
    detach_reference: bool,
    return_maps: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, lse, lse_ref, loss, maps, diff) of the one-pass subject op (semfid.backends.base)."""
    inp = SubjectInputs(q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, weights, scale,
                        mean_heads, detach_reference, return_maps)
    return get_backend(backend).subject_forward(inp)


_subject_fwd = torch.library.custom_op("semfid::subject_fwd", mutates_args=())(_subject_fwd_impl)


@_subject_fwd.register_fake
def _subject_fwd_fake(q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, weights, scale,
                      mean_heads, detach_reference, return_maps, backend):
    return empty_subject_outputs(q, v, tokens, mean_heads, detach_reference, return_maps,
                                 get_backend(backend).SUBJECT_SAVES_LSE)


def _subject_bwd_impl(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_ref: Tensor,
    bias: Optional[Tensor],
    ref_bias: Optional[Tensor],
    tokens: Tensor,
    ref_tokens: Tensor,
    weights: Optional[Tensor],
    scale: float,
    mean_heads: bool,
    detach_reference: bool,
    out: Tensor,
    lse: Tensor,
    lse_ref: Tensor,
    diff: Tensor,
    dout: Optional[Tensor],
    dloss: Optional[Tensor],
    dmaps: Optional[Tensor],
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dk_ref) of the subject op (dk_ref is empty when the reference is detached)."""
    inp = SubjectInputs(q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, weights, scale,
                        mean_heads, detach_reference, dmaps is not None)
    return get_backend(backend).subject_backward(inp, out, lse, lse_ref, diff, dout, dloss, dmaps)


_subject_bwd = torch.library.custom_op("semfid::subject_bwd", mutates_args=())(_subject_bwd_impl)


@_subject_bwd.register_fake
def _subject_bwd_fake(q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, weights, scale,
                      mean_heads, detach_reference, out, lse, lse_ref, diff, dout, dloss, dmaps,
                      backend):
    return empty_subject_grads(q, k, v, k_ref, detach_reference)


def _subject_setup_context(ctx, inputs, output):
    (q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, weights, scale, mean_heads,
     detach_reference, return_maps, backend) = inputs
    out, lse, lse_ref, _, _, diff = output
    ctx.save_for_backward(q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, weights, out, lse,
                          lse_ref, diff)
    ctx.scale, ctx.mean_heads, ctx.detach_reference = scale, mean_heads, detach_reference
    ctx.return_maps, ctx.backend = return_maps, backend
    ctx.mark_non_differentiable(lse, lse_ref, diff)
    ctx.set_materialize_grads(False)
    ctx.eager = False


def _subject_backward(ctx, dout, dlse, dlse_ref, dloss, dmaps, ddiff):
    if dout is None and dloss is None and dmaps is None:
        return (None,) * 14
    _refuse_double_backward("subject_attention")
    (q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, weights, out, lse, lse_ref,
     diff) = ctx.saved_tensors
    dq, dk, dv, dk_ref = (_subject_bwd_impl if ctx.eager else _subject_bwd)(
        q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, weights, ctx.scale, ctx.mean_heads,
        ctx.detach_reference, out, lse, lse_ref, diff, dout, dloss,
        dmaps if ctx.return_maps else None, ctx.backend,
    )
    return (dq, dk, dv, None if ctx.detach_reference else dk_ref) + (None,) * 10


_subject_fwd.register_autograd(_subject_backward, setup_context=_subject_setup_context)


# ------------------------------------------------------------------------------------------------
# the eager path: the same implementations and backward, without the custom-op dispatch
# ------------------------------------------------------------------------------------------------
def _eager_function(name: str, impl, setup_context, backward) -> type:
    """An autograd.Function running ``impl`` and the op's own ``setup_context`` / ``backward``
    directly: in eager mode the custom-op layer (schema checks, redispatch) costs more than a
    small layer's whole computation. Traced code (``torch.compile``, fake tensors, dispatch
    modes) keeps going through the registered op."""

    def forward(ctx, *args):
        output = impl(*args)
        setup_context(ctx, args, output)
        ctx.eager = True
        return output

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(backward),
    })


_EagerXattn = _eager_function("_EagerXattn", _xattn_fwd_impl, _xattn_setup_context, _xattn_backward)
_EagerSubject = _eager_function("_EagerSubject", _subject_fwd_impl, _subject_setup_context,
                                _subject_backward)


def _traced() -> bool:
    """True under torch.compile or any Python dispatch mode (FakeTensorMode, op counters)."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def _run(inp: XattnInputs, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    impl = select_backend(inp, backend)
    args = (inp.q, inp.k, inp.v, inp.bias, inp.select, inp.scale, inp.mean_heads, impl.NAME)
    return _xattn_fwd(*args) if _traced() else _EagerXattn.apply(*args)


def _zero_ragged_padding(maps: Tensor, selection: Optional[TokenSelection]) -> Tensor:
    """Maps of ragged rows come back padded to the longest row: zero the padding columns."""
    if selection is None or selection.weights is None:
        return maps
    mask = selection.valid_mask()
    return maps * (mask[:, None, :] if maps.dim() == 3 else mask[:, None, None, :])


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
    select: TokensLike = None,
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
        select (`Tensor` / `list` / `TokenSelection`, *optional*): key indices [S] (shared by the
            batch), [B, S], a ragged list of per-row lists (maps padded with zeros), or a
            :class:`semfid.TokenSelection`; duplicates allowed. When given, the selected
            probability columns are returned.
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
    return out if select is None else (out, _zero_ragged_padding(maps, inp.selection))


def subject_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_ref: Tensor,
    *,
    tokens: TokensLike,
    ref_tokens: TokensLike = None,
    scale: Optional[float] = None,
    attn_bias: Optional[Tensor] = None,
    ref_attn_bias: Optional[Tensor] = None,
    head_reduce: str = "mean",
    detach_reference: bool = True,
    return_maps: bool = False,
    backend: str = "auto",
) -> Union[Tuple[Tensor, Tensor], Tuple[Tensor, Tensor, Tensor]]:
    r"""Cross-attention output plus the subject-wise attention loss against reference keys.

    ``A_t = softmax(q kᵀ·s + attn_bias)[..., tokens]`` and ``A_r = softmax(q k_refᵀ·s +
    ref_attn_bias)[..., ref_tokens]``, both reduced over heads by ``head_reduce``;
    ``loss[b] = mean((A_t − A_r)²)`` over every non-batch dim (over row b's own tokens when rows
    are ragged). The same ``q`` is used for both (SeFi-IDE's subject-wise attention loss); both key
    sets, the maps and the loss come out of one fused pass (``semfid::subject_fwd``), and backward
    is one pass too.

    Args:
        q, k, v: as in :func:`cross_attention`.
        k_ref (`Tensor` [B, H, M_ref, D]): keys of the reference prompt.
        tokens (`Tensor` / `list` / `TokenSelection`): [S] or [B, S] target-prompt token
            indices, a ragged list of B per-row lists, or a :class:`semfid.TokenSelection`.
        ref_tokens (*optional*, defaults to ``tokens``): reference-prompt token indices in the same
            forms, as many per row as ``tokens``.
        scale, attn_bias, head_reduce, backend: as in :func:`cross_attention`.
        ref_attn_bias (`Tensor`, *optional*): additive per-key bias for ``k_ref``. Not differentiable.
        detach_reference (`bool`, *optional*, defaults to ``True``): when True no gradient flows
            through ``A_r`` (neither to ``k_ref`` nor to ``q``); ``q`` still gets the ``A_t`` path.
        return_maps (`bool`, *optional*, defaults to ``False``): also return the target maps
            ``A_t`` (differentiable; ragged rows padded with zeros).

    Returns:
        ``(out, loss)``, or ``(out, loss, maps_t)`` with ``return_maps``: ``out`` [B, H, N, Dv]
        exactly as :func:`cross_attention`, ``loss`` [B] and ``maps_t`` [B, N, S] / [B, H, N, S]
        in float32 (float64 for float64 inputs).
    """
    inp = SubjectInputs.validate(
        q, k, v, k_ref, tokens=tokens, ref_tokens=ref_tokens, scale=scale, attn_bias=attn_bias,
        ref_attn_bias=ref_attn_bias, head_reduce=head_reduce, detach_reference=detach_reference,
        return_maps=return_maps,
    )
    impl = select_backend(inp, backend)
    traced = _traced()
    native = None if traced else impl.eager_subject(inp)
    if native is not None:
        out, loss, maps = native
    else:
        args = (inp.q, inp.k, inp.v, inp.k_ref, inp.bias, inp.ref_bias, inp.tokens, inp.ref_tokens,
                inp.weights, inp.scale, inp.mean_heads, inp.detach_reference, inp.return_maps,
                impl.NAME)
        out, _, _, loss, maps, _ = _subject_fwd(*args) if traced else _EagerSubject.apply(*args)
    if return_maps:
        return out, loss, _zero_ragged_padding(maps, inp.selection)
    return out, loss


def attention_maps(
    q: Tensor,
    k: Tensor,
    *,
    select: TokensLike,
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
    return _zero_ragged_padding(_run(inp, backend)[2], inp.selection)


__all__ = ["cross_attention", "subject_attention", "attention_maps", "TokenSelection"]
