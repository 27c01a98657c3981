"""What a ``with`` block asks for, and what one UNet call hands to the processors.

Three layers of validation, each done once:

1. **Block entry** (:func:`TokenSpec.parse` in :mod:`.token_specs`, :func:`check_states`,
   ``IPTokens.parse`` in :mod:`.ip_maps`): types, ranks, widths, index signs — everything that does
   not depend on the UNet call. The result is a frozen request:
   :class:`CaptureRequest`, :class:`LossRequest` or :class:`ValuesRequest`.
2. **UNet call** (:func:`plan_call`, run by the controller's pre-hook): batch sizes, token ranges
   against the call's ``encoder_hidden_states`` and devices; the token lists become
   :class:`semfid.TokenSelection` objects on the call's device, and one :class:`LayerPlan` per
   chosen layer is built. The result is a :class:`CallState`.
3. **Per layer**: nothing is checked or copied; the processor looks its plan up by name and passes
   the selections to the fused ops, which only compare sizes. Image-prompt tokens
   (``capture(..., ip_tokens=...)``) are the exception: an adapter's key count is known only in
   the layer, so they are bounded there (:func:`bound`: eagerly a range check naming the adapter).

Compile stability. Under ``torch.compile`` the pre-hook and the processors are traced, and Dynamo
guards on every Python value they read. So what a call reads is either a tensor (token indices,
loss weights, reference / value states, masks: guarded on shape, dtype, device only) or a *static*
value that stays the same from step to step of a loop (layer names, token counts S, per-row
lengths, ``head_reduce``, ``keep_maps``, which optional tensors exist, ``M``, the batch size).
Nothing traced reads an object's identity or a per-step integer: a token list's largest index is
range-checked before the call in eager mode, and under tracing the indices are clamped to
``M - 1`` in the graph and the check runs when the recorder is read (:class:`CallSink`).

Results leave a call through a :class:`CallSink` per recording request: a chain of plain dicts
(the current one is always empty when a call starts, so the guard on it never changes); the
processors write each layer's tensors into it once (a gradient-checkpoint recompute finds them
there and writes nothing), and the recorder folds the chain into its maps / losses when read.

The processor depends on this module only through :class:`CallStateProtocol`, :class:`LayerPlan`,
:class:`CaptureItem` and :class:`LossItem`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, FrozenSet, Mapping, Optional, Protocol, Sequence, Tuple, Union

import torch

from .._inputs import TokenSelection
from .token_specs import TokenSpec, bound, check_token_range

if TYPE_CHECKING:
    from .ip_maps import IPTokens

Tensor = torch.Tensor
StatesLike = Union[Tensor, Dict[str, Tensor]]
ACCUMULATE = ("last", "mean", "list")


# ------------------------------------------------------------------------------------------------
# text states, checked at block entry and per call
# ------------------------------------------------------------------------------------------------
def check_states(states: Tensor, arg: str, width: int, layer: str) -> None:
    """A [B, M, C] text-state tensor with the input width of ``layer``'s projection."""
    if not isinstance(states, Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor [B, M, C] (or a dict of them), got {type(states).__name__}")
    if states.dim() != 3:
        raise ValueError(f"{arg} must be [B, M, C] text states, got shape {tuple(states.shape)}")
    if states.shape[-1] != width:
        raise ValueError(
            f"{arg} must have width C={width} (the input width of {layer}'s projection), "
            f"got shape {tuple(states.shape)}"
        )
    if states.shape[1] == 0:
        raise ValueError(f"{arg} must hold at least one token, got shape {tuple(states.shape)}")


def check_states_for_call(states: Tensor, arg: str, ehs: Tensor, *, same_length: bool) -> None:
    b, m = ehs.shape[0], ehs.shape[1]
    if states.shape[0] not in (1, b):
        raise ValueError(
            f"{arg} must have batch 1 or the UNet call's batch {b} (under classifier-free guidance "
            f"the full batch, both halves), got shape {tuple(states.shape)}"
        )
    if same_length and states.shape[1] != m:
        raise ValueError(
            f"{arg} must have the {m} tokens of encoder_hidden_states (keys and values pair up), "
            f"got shape {tuple(states.shape)}"
        )
    if states.dtype != ehs.dtype:
        raise TypeError(f"{arg} must have the dtype of encoder_hidden_states ({ehs.dtype}), got {states.dtype}")
    if states.device != ehs.device:
        raise ValueError(f"{arg} must be on the device of encoder_hidden_states ({ehs.device}), got {states.device}")


def states_of(states: Optional[StatesLike]) -> Tuple[Tensor, ...]:
    """Every tensor of a tensor-or-dict ``states`` argument."""
    if states is None:
        return ()
    return tuple(states.values()) if isinstance(states, dict) else (states,)


def per_layer(states: Optional[StatesLike], name: str) -> Optional[Tensor]:
    return states.get(name) if isinstance(states, dict) else states


# ------------------------------------------------------------------------------------------------
# the three request kinds (one per `with` block; frozen once built)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class CaptureRequest:
    layers: FrozenSet[str]
    tokens: Optional[TokenSpec]  # None: image-prompt maps only
    head_reduce: str
    recorder: object
    ip_tokens: Optional["IPTokens"] = None  # image-prompt tokens per adapter (ip_maps.py)
    ip_layers: FrozenSet[str] = frozenset()  # the chosen layers that run an IP-Adapter

    @property
    def recorded_layers(self) -> FrozenSet[str]:
        """The layers every call of the block must record (checked at block exit)."""
        return self.layers if self.tokens is not None else self.ip_layers


@dataclass(frozen=True, eq=False)
class LossRequest:
    layers: FrozenSet[str]
    tokens: TokenSpec
    ref_tokens: TokenSpec
    head_reduce: str
    reference_states: StatesLike
    ref_bias: Optional[Tensor]  # [B or 1, 1, M_ref] additive, or None
    value_states: Optional[StatesLike]
    keep_maps: bool
    recorder: object
    same_tokens: bool = False  # ref_tokens defaulted to tokens (compared here, not while traced)

    @property
    def recorded_layers(self) -> FrozenSet[str]:
        return self.layers


@dataclass(frozen=True, eq=False)
class ValuesRequest:
    layers: FrozenSet[str]
    value_states: StatesLike
    recorder: None = None


Request = Union[CaptureRequest, LossRequest, ValuesRequest]


# ------------------------------------------------------------------------------------------------
# what one layer does in one call (the processor's side of the protocol)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class CaptureItem:
    results: Dict[str, tuple]  # the call's CallSink results: layer name -> (maps, None)
    tokens: Optional[TokenSelection]  # on the call's device; None: image-prompt maps only
    head_reduce: str
    ip: Optional["IPTokens"] = None  # per adapter: "all" or a placed, not yet bounded selection
    ip_results: Optional[dict] = None  # (layer, adapter) -> (maps, keys, tokens per image)


@dataclass(frozen=True, eq=False)
class LossItem:
    results: Dict[str, tuple]  # layer name -> (loss [B], maps or None)
    reference_states: Tensor  # this layer's [B or 1, M_ref, C]
    tokens: TokenSelection
    ref_tokens: TokenSelection
    head_reduce: str
    ref_bias: Optional[Tensor]
    keep_maps: bool


@dataclass(frozen=True, eq=False)
class LayerPlan:
    value_states: Optional[Tensor]
    captures: Tuple[CaptureItem, ...]  # maps of the text tokens
    loss: Optional[LossItem]
    ip_captures: Tuple[CaptureItem, ...] = ()  # maps of the image-prompt tokens (IP-Adapter layers)

    @property
    def wants_maps(self) -> bool:
        return self.loss is not None or bool(self.captures)


class CallStateProtocol(Protocol):
    """What :class:`~semfid.diffusers.processors.SemfidAttnProcessor` reads from ``semfid_call``."""

    owner: object
    plans: Mapping[str, LayerPlan]

    def record(self, item: Union[CaptureItem, LossItem], name: str, value: Tensor,
               maps: Optional[Tensor] = None) -> None: ...


class CallSink:
    """Where a recording request's results leave its UNet calls: a chain of plain dicts.

    ``current`` is the (empty) dict the next call will fill. A call takes it, puts in
    ``"results"`` (layer name -> ``(value, maps)``, filled by the processors), ``"ip"`` (the
    image-prompt maps, ``(layer, adapter) -> (maps, keys, tokens per image)``), ``"grids"`` and
    ``"num_keys"`` (``M`` and ``M_ref`` of the call, for the deferred range check), links a new
    empty dict under ``"next"`` and makes that the current one. Only dicts, tensors and static
    values are touched, so a compiled UNet neither guards on the block nor recompiles per call;
    the recorder reads the chain eagerly (:meth:`take`) and drops what it has read.
    """

    __slots__ = ("current",)

    def __init__(self):
        self.current: dict = {}

    def open_call(self, grids: Dict[str, Optional[Tuple[int, int]]], num_keys: Tuple[int, int]) -> dict:
        """Start one call: returns its entry (``"results"``, ``"ip"``: dicts the processors fill)."""
        entry, nxt = self.current, {}
        entry["results"] = {}
        entry["ip"] = {}
        entry["grids"] = grids
        entry["num_keys"] = num_keys
        entry["next"] = nxt
        self.current = nxt
        return entry

    @staticmethod
    def take(head: dict) -> Tuple[list, dict]:
        """The calls recorded from ``head`` on (each a dict as above), and the new head."""
        calls = []
        while "next" in head:
            calls.append(head)
            head = head["next"]
        return calls, head


class CallState:
    """The plans of one UNet call; processors record into each request's sink once per layer,
    so that a gradient-checkpoint recompute of the call records nothing a second time."""

    def __init__(self, owner: object, plans: Dict[str, LayerPlan]):
        self.owner = owner
        self.plans = plans

    @staticmethod
    def record(item, name: str, value: Tensor, maps: Optional[Tensor] = None) -> None:
        if name not in item.results:  # else a gradient-checkpoint recompute of this call
            item.results[name] = (value, maps)


def plan_call(owner: object, requests: Sequence[Request], ehs: Tensor,
              grids: Dict[str, Optional[Tuple[int, int]]]) -> CallState:
    """Validate ``requests`` against one call's ``encoder_hidden_states`` [B, M, C]; build the plans.

    Reads only tensors and static values of the requests (see the module docstring), so that it
    traces under ``torch.compile`` into guards that hold from one training step to the next.
    """
    b, m, dev = ehs.shape[0], ehs.shape[1], ehs.device
    placed = []
    for r in requests:
        if r.recorder is not None and not torch.compiler.is_compiling():
            r.recorder._fold()  # eager: the previous calls' results, so the chain stays short
        for states in states_of(getattr(r, "value_states", None)):
            check_states_for_call(states, "value_states", ehs, same_length=True)
        if isinstance(r, CaptureRequest):
            tokens = None if r.tokens is None else r.tokens.for_call(b, m, dev, "encoder_hidden_states")
            ip = None if r.ip_tokens is None else r.ip_tokens.place(b, dev)
            entry = r.recorder._sink.open_call(grids, (m, m))
            placed.append(CaptureItem(entry["results"], tokens, r.head_reduce, ip, entry["ip"]))
        elif isinstance(r, LossRequest):
            tokens = r.tokens.for_call(b, m, dev, "encoder_hidden_states")
            m_ref = [s.shape[1] for s in states_of(r.reference_states)]
            for states in states_of(r.reference_states):
                check_states_for_call(states, "reference_states", ehs, same_length=False)
            if r.ref_bias is not None and r.ref_bias.shape[0] not in (1, b):
                raise ValueError(f"ref_attention_mask must have batch 1 or {b}, got batch {r.ref_bias.shape[0]}")
            ref = tokens if r.same_tokens and set(m_ref) == {m} else \
                r.ref_tokens.for_call(b, min(m_ref), dev, "reference_states")
            ref_bias = None if r.ref_bias is None else r.ref_bias.to(dev, non_blocking=True)
            placed.append((tokens, ref, ref_bias, r.recorder._sink.open_call(grids, (m, min(m_ref)))["results"]))
        else:
            placed.append(None)

    names = sorted(set().union(*(r.layers for r in requests)))
    plans: Dict[str, LayerPlan] = {}
    for name in names:
        value_states = None
        for r in reversed(requests):  # innermost block giving values for this layer wins
            vs = getattr(r, "value_states", None)
            if vs is not None and name in r.layers:
                value_states = per_layer(vs, name)
                if value_states is not None:
                    break
        mine = [(r, p) for r, p in zip(requests, placed) if isinstance(r, CaptureRequest) and name in r.layers]
        captures = tuple(p for r, p in mine if r.tokens is not None)
        ip_captures = tuple(p for r, p in mine if r.ip_tokens is not None and name in r.ip_layers)
        loss = None
        for r, p in zip(requests, placed):
            if isinstance(r, LossRequest) and name in r.layers:
                tokens, ref, ref_bias, results = p
                loss = LossItem(results, per_layer(r.reference_states, name), tokens, ref, r.head_reduce,
                                ref_bias, r.keep_maps)
        if value_states is not None or captures or loss is not None or ip_captures:
            plans[name] = LayerPlan(value_states, captures, loss, ip_captures)
    return CallState(owner, plans)


__all__ = ["TokenSpec", "bound", "check_token_range", "CaptureRequest", "LossRequest", "ValuesRequest", "CaptureItem", "LossItem",
           "LayerPlan", "CallState", "CallSink", "CallStateProtocol", "plan_call", "ACCUMULATE"]
