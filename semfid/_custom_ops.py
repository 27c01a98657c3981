"""The ``torch.library`` custom ops behind :mod:`semfid.ops`, their fakes and autograd.

Two pairs of ops carry the work (``torch.compile`` and ``torch.library.opcheck`` see through
them; their fakes return exactly the layouts the backends allocate, see :mod:`semfid.backends.base`):

* ``semfid::xattn_fwd`` / ``xattn_bwd`` — one pass of attention with selected map columns;
* ``semfid::subject_fwd`` / ``subject_bwd`` — target maps, reference maps, the loss and its
  gradient in one pass per direction.

The backend's name travels into the op as a string, so the backward always runs on the backend
that ran the forward; the query / key ranges of joint key sets (``map_start``, ``map_stop``,
``seg_start``, ``seg_stop``) travel as trailing ints. Inside the ops the flat arguments become
input objects again, without re-validation.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._inputs import SubjectInputs, XattnInputs
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
    map_start: int = 0,
    map_stop: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(out, lse, maps) of one fused pass; shapes in :mod:`semfid.backends.base`."""
    inp = XattnInputs(q, k, v, bias, select, scale, mean_heads, None, map_start, map_stop)
    return get_backend(backend).forward(inp)


_xattn_fwd = torch.library.custom_op("semfid::xattn_fwd", mutates_args=())(_xattn_fwd_impl)


@_xattn_fwd.register_fake
def _xattn_fwd_fake(q, k, v, bias, select, scale, mean_heads, backend, map_start=0, map_stop=None):
    rows = (q.shape[2] if map_stop is None else map_stop) - map_start
    return empty_forward_outputs(q, k, v, select, mean_heads, rows)


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
    map_start: int = 0,
    map_stop: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of one fused pass (dv is empty when v is None)."""
    inp = XattnInputs(q, k, v, bias, select, scale, mean_heads, None, map_start, map_stop)
    return get_backend(backend).backward(inp, out, lse, dout, dmaps)


_xattn_bwd = torch.library.custom_op("semfid::xattn_bwd", mutates_args=())(_xattn_bwd_impl)


@_xattn_bwd.register_fake
def _xattn_bwd_fake(q, k, v, bias, select, scale, mean_heads, out, lse, dout, dmaps, backend,
                    map_start=0, map_stop=None):
    dv = torch.empty_like(v) if v is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), dv


def _xattn_setup_context(ctx, inputs, output):
    q, k, v, bias, select, scale, mean_heads, backend = inputs[:8]
    out, lse, _ = output
    ctx.save_for_backward(q, k, v, bias, select, out, lse)
    ctx.scale, ctx.mean_heads, ctx.backend = scale, mean_heads, backend
    ctx.ranges = tuple(inputs[8:])  # (map_start, map_stop) when given
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)
    ctx.eager = False


def _refuse_double_backward(op: str) -> None:
    """The backward passes are not themselves differentiable: they take the saved softmax
    statistics (lse, the head-mean diff) as constants, so a graph built through them
    (``create_graph=True``) would give wrong second derivatives. Say so instead."""
    if torch.is_grad_enabled() and not traced():
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
        return (None,) * (8 + len(ctx.ranges))
    _refuse_double_backward("cross_attention / attention_maps")
    dq, dk, dv = (_xattn_bwd_impl if ctx.eager else _xattn_bwd)(
        q, k, v, bias, select, ctx.scale, ctx.mean_heads, out, lse, dout, dmaps, ctx.backend,
        *ctx.ranges
    )
    return (dq, dk, (dv if v is not None else None)) + (None,) * (5 + len(ctx.ranges))


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
    map_start: int = 0,
    map_stop: Optional[int] = None,
    seg_start: int = 0,
    seg_stop: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, lse, lse_ref, loss, maps, diff) of the one-pass subject op (semfid.backends.base)."""
    inp = SubjectInputs(q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, weights, scale,
                        mean_heads, detach_reference, return_maps, None, map_start, map_stop,
                        seg_start, seg_stop)
    return get_backend(backend).subject_forward(inp)


_subject_fwd = torch.library.custom_op("semfid::subject_fwd", mutates_args=())(_subject_fwd_impl)


@_subject_fwd.register_fake
def _subject_fwd_fake(q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, weights, scale,
                      mean_heads, detach_reference, return_maps, backend, map_start=0,
                      map_stop=None, seg_start=0, seg_stop=None):
    inp = SubjectInputs(q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, weights, scale,
                        mean_heads, detach_reference, return_maps, None, map_start, map_stop,
                        seg_start, seg_stop)
    return empty_subject_outputs(q, v, tokens, mean_heads, detach_reference, return_maps,
                                 get_backend(backend).subject_saves_lse(inp), inp.num_map_queries)


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
    map_start: int = 0,
    map_stop: Optional[int] = None,
    seg_start: int = 0,
    seg_stop: Optional[int] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dk_ref) of the subject op (dk_ref is empty when the reference is detached)."""
    inp = SubjectInputs(q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, weights, scale,
                        mean_heads, detach_reference, dmaps is not None, None, map_start, map_stop,
                        seg_start, seg_stop)
    return get_backend(backend).subject_backward(inp, out, lse, lse_ref, diff, dout, dloss, dmaps)


_subject_bwd = torch.library.custom_op("semfid::subject_bwd", mutates_args=())(_subject_bwd_impl)


@_subject_bwd.register_fake
def _subject_bwd_fake(q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, weights, scale,
                      mean_heads, detach_reference, out, lse, lse_ref, diff, dout, dloss, dmaps,
                      backend, map_start=0, map_stop=None, seg_start=0, seg_stop=None):
    return empty_subject_grads(q, k, v, k_ref, detach_reference)


def _subject_setup_context(ctx, inputs, output):
    (q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, weights, scale, mean_heads,
     detach_reference, return_maps, backend) = inputs[:14]
    out, lse, lse_ref, _, _, diff = output
    ctx.ranges = tuple(inputs[14:])  # (map_start, map_stop, seg_start, seg_stop) when given
    ctx.save_for_backward(q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, weights, out, lse,
                          lse_ref, diff)
    ctx.scale, ctx.mean_heads, ctx.detach_reference = scale, mean_heads, detach_reference
    ctx.return_maps, ctx.backend = return_maps, backend
    ctx.mark_non_differentiable(lse, lse_ref, diff)
    ctx.set_materialize_grads(False)
    ctx.eager = False


def _subject_backward(ctx, dout, dlse, dlse_ref, dloss, dmaps, ddiff):
    if dout is None and dloss is None and dmaps is None:
        return (None,) * (14 + len(ctx.ranges))
    _refuse_double_backward("subject_attention")
    (q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, weights, out, lse, lse_ref,
     diff) = ctx.saved_tensors
    dq, dk, dv, dk_ref = (_subject_bwd_impl if ctx.eager else _subject_bwd)(
        q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens, weights, ctx.scale, ctx.mean_heads,
        ctx.detach_reference, out, lse, lse_ref, diff, dout, dloss,
        dmaps if ctx.return_maps else None, ctx.backend, *ctx.ranges
    )
    return (dq, dk, dv, None if ctx.detach_reference else dk_ref) + (None,) * (10 + len(ctx.ranges))


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


def traced() -> bool:
    """True under torch.compile or any Python dispatch mode (FakeTensorMode, op counters)."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def run_xattn(inp: XattnInputs, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(out, lse, maps) of ``semfid::xattn_fwd`` on the chosen backend, differentiable."""
    impl = select_backend(inp, backend)
    args = (inp.q, inp.k, inp.v, inp.bias, inp.select, inp.scale, inp.mean_heads, impl.NAME,
            inp.map_start, inp.map_stop)
    return _xattn_fwd(*args) if traced() else _EagerXattn.apply(*args)


def run_subject(inp: SubjectInputs, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(out, loss, maps) of ``semfid::subject_fwd`` (or the backend's native eager call)."""
    impl = select_backend(inp, backend)
    is_traced = traced()
    native = None if is_traced else impl.eager_subject(inp)
    if native is not None:
        return native
    args = (inp.q, inp.k, inp.v, inp.k_ref, inp.bias, inp.ref_bias, inp.tokens, inp.ref_tokens,
            inp.weights, inp.scale, inp.mean_heads, inp.detach_reference, inp.return_maps,
            impl.NAME, inp.map_start, inp.map_stop, inp.seg_start, inp.seg_stop)
    out, _, _, loss, maps, _ = _subject_fwd(*args) if is_traced else _EagerSubject.apply(*args)
    return out, loss, maps
