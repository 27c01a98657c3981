"""The ``with`` blocks of a controller: building the frozen requests (block-entry validation) and
the context manager that makes them active for the calling thread.

:class:`~semfid.diffusers.controller.SemfidController`'s ``capture`` / ``subject_loss`` /
``values`` methods are thin wrappers over :func:`capture_block`, :func:`subject_loss_block` and
:func:`values_block`. This module needs only the few controller methods of :class:`BlockHost`
(it does not import the controller, which imports it).
"""

from __future__ import annotations

from typing import Dict, FrozenSet, Iterable, List, Optional, Protocol

import torch

from .._inputs import HEAD_REDUCTIONS
from .ip_adapter import SemfidIPAdapterAttnProcessor
from .ip_maps import IPTokens
from .recorders import AttentionRecorder, SubjectLossRecorder
from .requests import (
    CaptureRequest,
    LossRequest,
    StatesLike,
    TokenSpec,
    ValuesRequest,
    check_states,
    check_token_range,
    states_of,
)

Tensor = torch.Tensor


class BlockHost(Protocol):
    """What a block needs of :class:`~semfid.diffusers.controller.SemfidController`."""

    layers: List[str]
    _processors: Dict[str, object]  # layer name -> this controller's processor
    _k_width: Dict[str, int]
    _v_width: Dict[str, int]

    def _choose(self, layers) -> List[str]: ...

    def _device(self) -> torch.device: ...

    def _check_processors(self, names: Iterable[str]) -> None: ...

    def _push(self, request) -> None: ...

    def _pop(self, request) -> None: ...


class Block:
    """Context manager for one ``with`` block: activates its request on enter, drops it on exit."""

    def __init__(self, controller: BlockHost, request, result):
        self._ctl = controller
        self._request = request
        self._result = result

    def __enter__(self):
        self._ctl._check_processors(self._request.layers)
        self._ctl._push(self._request)
        return self._result

    def __exit__(self, exc_type, exc, tb):
        self._ctl._pop(self._request)
        rec = self._request.recorder
        if exc_type is None and rec is not None and rec.num_calls > 0:
            got = rec._losses.names() if isinstance(rec, SubjectLossRecorder) else rec._recorded_layers()
            missing = sorted(self._request.recorded_layers.difference(got))
            if missing:
                raise RuntimeError(
                    f"{len(missing)} chosen layer(s) ran without recording (e.g. {missing[0]}): their "
                    "semfid processors were replaced or bypassed during the block "
                    "(set_attn_processor, enable_xformers_memory_efficient_attention, "
                    "fuse_qkv_projections, load_ip_adapter, ...)"
                )
        return False


def _head_reduce(head_reduce: str) -> str:
    if not isinstance(head_reduce, str) or head_reduce not in HEAD_REDUCTIONS:
        raise ValueError(f"head_reduce must be one of {HEAD_REDUCTIONS}, got {head_reduce!r}")
    return head_reduce


def _states(states: Optional[StatesLike], arg: str, layers: List[str], widths: Dict[str, int],
            *, required_for_all: bool) -> Optional[StatesLike]:
    if states is None:
        return None
    if isinstance(states, dict):
        unknown = [k for k in states if k not in layers]
        if unknown:
            raise ValueError(
                f"{arg} has entries for layers that are not chosen here: {unknown[:3]} "
                f"(chosen: {len(layers)} layers, e.g. {layers[0]})"
            )
        if required_for_all:
            missing = [n for n in layers if n not in states]
            if missing:
                raise ValueError(f"{arg} must have an entry for every chosen layer; missing {missing[:3]}")
        for n, t in states.items():
            check_states(t, f"{arg}[{n!r}]", widths[n], n)
        return dict(states)
    for n in layers:
        check_states(states, arg, widths[n], n)
    return states


def _aligned(tokens, ref_tokens):
    """Unpack an :class:`~semfid.diffusers.alignment.AlignedTokens` given as ``tokens``."""
    from .alignment import AlignedTokens

    if isinstance(tokens, AlignedTokens):
        if ref_tokens is not None:
            raise ValueError("ref_tokens must be None when tokens is an AlignedTokens (it holds both)")
        return tokens.tokens, tokens.ref_tokens
    return tokens, ref_tokens


def _limit(spec: TokenSpec, states_arg: str):
    """What a call's key count is checked against (see recorders._Recorder._fold)."""
    return (spec.max_index, spec.arg, states_arg)


def _ip_layers(ctl: BlockHost, chosen: List[str], ip: IPTokens) -> FrozenSet[str]:
    """The chosen layers running an IP-Adapter (diffusers' processors adopted first), checked
    against ``ip``: at least one, and the adapters it names exist."""
    ctl._check_processors(chosen)
    layers = {n: ctl._processors[n] for n in chosen if isinstance(ctl._processors[n], SemfidIPAdapterAttnProcessor)}
    ip.check_adapters(layers, len(chosen))
    return frozenset(layers)


def capture_block(ctl: BlockHost, tokens, head_reduce: str = "mean", layers=None,
                  accumulate: str = "last", ip_tokens=None) -> Block:
    chosen = ctl._choose(layers)
    tokens, _ = _aligned(tokens, None)
    if tokens is None and ip_tokens is None:
        raise ValueError("tokens must give text-token indices (or pass ip_tokens= for the maps of "
                         "image-prompt tokens only), got None")
    spec = None if tokens is None else TokenSpec.parse(tokens, "tokens")
    ip = None if ip_tokens is None else IPTokens.parse(ip_tokens)
    hr = _head_reduce(head_reduce)
    ip_layers = frozenset() if ip is None else _ip_layers(ctl, chosen, ip)
    device = ctl._device()
    rec = AttentionRecorder(None if spec is None else spec.lengths, hr, accumulate, ip)
    rec._limits = () if spec is None else (_limit(spec, "encoder_hidden_states"),) * 2
    req = CaptureRequest(frozenset(chosen), None if spec is None else spec.to(device), hr, rec,
                         None if ip is None else ip.to(device), ip_layers)
    return Block(ctl, req, rec)


def subject_loss_block(ctl: BlockHost, reference_states: StatesLike, tokens, ref_tokens=None,
                       value_states: Optional[StatesLike] = None, head_reduce: str = "mean", layers=None,
                       *, ref_attention_mask: Optional[Tensor] = None, keep_maps: bool = False) -> Block:
    chosen = ctl._choose(layers)
    tokens, ref_tokens = _aligned(tokens, ref_tokens)
    spec = TokenSpec.parse(tokens, "tokens")
    ref = spec if ref_tokens is None else TokenSpec.parse(ref_tokens, "ref_tokens")
    shared = spec.shared or ref.shared
    if (set(spec.lengths) != set(ref.lengths)) if shared else (spec.lengths != ref.lengths):
        if len(set(spec.lengths)) == 1 and len(set(ref.lengths)) == 1:
            raise ValueError(f"ref_tokens must select as many tokens as tokens ({spec.lengths[0]}), "
                             f"got {ref.lengths[0]}")
        raise ValueError(f"ref_tokens must select as many tokens per row as tokens "
                         f"({list(spec.lengths)}), got {list(ref.lengths)}")
    hr = _head_reduce(head_reduce)
    if not isinstance(keep_maps, bool):
        raise TypeError(f"keep_maps must be a bool, got {type(keep_maps).__name__}")
    if reference_states is None:
        raise ValueError("reference_states must be the reference prompt's text states [B, M_ref, C], got None")
    refs = _states(reference_states, "reference_states", chosen, ctl._k_width, required_for_all=True)
    for states in states_of(refs):
        check_token_range(ref.max_index, states.shape[1], ref.arg, "reference_states")
    vals = _states(value_states, "value_states", chosen, ctl._v_width, required_for_all=False)
    ref_bias = None
    if ref_attention_mask is not None:
        m = ref_attention_mask
        if not isinstance(m, Tensor) or m.dim() not in (1, 2):
            raise ValueError("ref_attention_mask must be a keep-mask tensor [B, M_ref], got "
                             f"{getattr(m, 'shape', type(m).__name__)}")
        m = m if m.dim() == 2 else m[None]
        for states in states_of(refs):
            if m.shape[-1] != states.shape[1]:
                raise ValueError(
                    f"ref_attention_mask must have the M_ref={states.shape[1]} tokens of "
                    f"reference_states, got shape {tuple(ref_attention_mask.shape)}"
                )
        ref_bias = ((1 - m.to(torch.float32)) * -10000.0)[:, None, :]  # diffusers' convention
    rec = SubjectLossRecorder()
    rec._limits = (_limit(spec, "encoder_hidden_states"), _limit(ref, "reference_states"))
    device = ctl._device()
    placed = spec.to(device)
    req = LossRequest(frozenset(chosen), placed, placed if ref is spec else ref.to(device), hr, refs,
                      ref_bias, vals, keep_maps, rec, same_tokens=ref is spec)
    return Block(ctl, req, rec)


def values_block(ctl: BlockHost, value_states: StatesLike) -> Block:
    if value_states is None:
        raise ValueError("value_states must be a tensor [B, M, C] or a {layer name: tensor} dict, got None")
    vals = _states(value_states, "value_states", ctl.layers, ctl._v_width, required_for_all=False)
    return Block(ctl, ValuesRequest(frozenset(ctl.layers), vals), None)


__all__ = ["Block", "BlockHost", "capture_block", "subject_loss_block", "values_block"]
