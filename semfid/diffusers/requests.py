"""What a ``with`` block asks for, and what one UNet call hands to the processors.

Three layers of validation, each done once:

1. **Block entry** (:func:`TokenSpec.parse`, :func:`check_states`): types, ranks, widths, index
   signs — everything that does not depend on the UNet call. The result is a frozen request:
   :class:`CaptureRequest`, :class:`LossRequest` or :class:`ValuesRequest`.
2. **UNet call** (:func:`plan_call`, run by the controller's pre-hook): batch sizes, token ranges
   against the call's ``encoder_hidden_states`` and devices; the token lists become
   :class:`semfid.TokenSelection` objects on the call's device, and one :class:`LayerPlan` per
   chosen layer is built. The result is a :class:`CallState`.
3. **Per layer**: nothing is checked or copied; the processor looks its plan up by name and passes
   the selections to the fused ops, which only compare sizes.

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
from typing import Dict, FrozenSet, Mapping, Optional, Protocol, Sequence, Tuple, Union

import torch

from .._inputs import TokenSelection

Tensor = torch.Tensor
StatesLike = Union[Tensor, Dict[str, Tensor]]
ACCUMULATE = ("last", "mean", "list")


# ------------------------------------------------------------------------------------------------
# token lists, checked at block entry
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenSpec:
    """Token positions checked at block entry and placed once on the model's device.

    Attributes:
        selection (`TokenSelection`): the indices, [1, S] when ``shared`` else [B, S] (ragged
            rows padded, with weights); ``max_index`` and ``lengths`` are Python values known at
            block entry.
        shared (`bool`): one list for every row of any batch ([S]).
        arg (`str`): the argument name for error messages.
    """

    selection: TokenSelection
    shared: bool
    arg: str

    @property
    def max_index(self) -> int:
        return self.selection.max_index

    @property
    def lengths(self) -> Tuple[int, ...]:
        return self.selection.lengths

    @classmethod
    def parse(cls, tokens, arg: str) -> "TokenSpec":
        """[S] / [B, S] ints (list or tensor), ragged per-row lists, or a ``TokenSelection``."""
        if tokens is None:
            raise ValueError(f"{arg} must give token indices as a list of ints or an int64 tensor "
                             "[S] / [B, S] (or per-row lists), got None")
        if isinstance(tokens, TokenSelection):
            sel = TokenSelection.build(tokens, batch=tokens.batch, num_keys=tokens.max_index + 1,
                                       device="cpu", name=arg)
            return cls(sel, False, arg)
        if isinstance(tokens, int) and not isinstance(tokens, bool):
            tokens = [tokens]
        if isinstance(tokens, Tensor):
            if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
                raise TypeError(f"{arg} must hold integer token indices, got dtype {tokens.dtype}")
            tokens = tokens.detach().cpu()  # one host sync here, none per call or layer
            rows = tokens.shape[0] if tokens.dim() == 2 else 1
            low = int(tokens.min()) if tokens.numel() else 0
        elif isinstance(tokens, (list, tuple)):
            nested = [r for r in tokens if isinstance(r, (list, tuple))]
            flat = [x for r in tokens for x in (r if isinstance(r, (list, tuple)) else [r])]
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in flat):
                raise TypeError(f"{arg} must hold integer token indices, got {tokens!r}")
            rows = len(tokens) if nested else 1
            low = min(flat) if flat else 0
        else:
            raise TypeError(f"{arg} must be a list of ints, per-row lists or an int64 tensor "
                            f"[S] / [B, S], got {type(tokens).__name__}")
        if low < 0:
            raise ValueError(f"{arg} must be non-negative token positions, got min {low}")
        # shapes, empty rows and integer types: the same checks the fused ops make
        sel = TokenSelection.build(tokens, batch=rows, num_keys=2 ** 62, device="cpu", name=arg)
        shared = not (isinstance(tokens, Tensor) and tokens.dim() == 2) and not (
            isinstance(tokens, (list, tuple)) and any(isinstance(r, (list, tuple)) for r in tokens))
        return cls(sel, shared, arg)

    def to(self, device: torch.device) -> "TokenSpec":
        """The same spec with its index (and weight) tensors on ``device`` (once per block)."""
        sel = self.selection
        if sel.device == device:
            return self
        weights = None if sel.weights is None else sel.weights.to(device, non_blocking=True)
        moved = TokenSelection(sel.index.to(device, non_blocking=True), weights, sel.lengths, sel.max_index)
        return TokenSpec(moved, self.shared, self.arg)

    def for_call(self, batch: int, num_keys: int, device: torch.device, states_arg: str) -> TokenSelection:
        """Check against one call's sizes and give its selection on ``device`` (once per call).

        Traced (``torch.compile``): reads only static values; the indices are clamped to
        ``num_keys - 1`` in the graph, so a list too long for this call cannot read past the keys,
        and the range is checked when the recorder is read (:meth:`CallSink.num_keys`).
        """
        sel = self.selection
        if not self.shared and sel.batch != batch:
            raise ValueError(
                f"{self.arg} has {sel.batch} rows but the UNet call has batch {batch}: give [S] "
                f"(shared) or [B={batch}, S] (under classifier-free guidance B counts both halves)"
            )
        traced = torch.compiler.is_compiling()
        if not traced:
            check_token_range(self.max_index, num_keys, self.arg, states_arg)
        index, weights = sel.index, sel.weights
        if index.device != device:  # the model moved since block entry
            index = index.to(device, non_blocking=True)
            weights = None if weights is None else weights.to(device, non_blocking=True)
        if self.shared:
            index = index.expand(batch, -1)
        if traced:
            index = index.clamp(max=num_keys - 1)
        lengths = sel.lengths * batch if self.shared else sel.lengths
        # traced: an upper bound that is the same every step (the real maximum varies by step)
        return TokenSelection(index, weights, lengths, num_keys - 1 if traced else self.max_index)


def check_token_range(hi: int, length: int, arg: str, states_arg: str) -> None:
    if hi >= length:
        raise ValueError(
            f"{arg} must index the {length} text tokens of {states_arg} (0 ... {length - 1}), "
            f"got index {hi}"
        )


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
    tokens: TokenSpec
    head_reduce: str
    recorder: object


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
    tokens: TokenSelection  # on the call's device
    head_reduce: str


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
    captures: Tuple[CaptureItem, ...]
    loss: Optional[LossItem]

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
    ``"results"`` (layer name -> ``(value, maps)``, filled by the processors), ``"grids"`` and
    ``"num_keys"`` (``M`` and ``M_ref`` of the call, for the deferred range check), links a new
    empty dict under ``"next"`` and makes that the current one. Only dicts, tensors and static
    values are touched, so a compiled UNet neither guards on the block nor recompiles per call;
    the recorder reads the chain eagerly (:meth:`take`) and drops what it has read.
    """

    __slots__ = ("current",)

    def __init__(self):
        self.current: dict = {}

    def open_call(self, grids: Dict[str, Optional[Tuple[int, int]]], num_keys: Tuple[int, int]) -> dict:
        """Start one call: returns its results dict (layer name -> (value, maps))."""
        entry, nxt = self.current, {}
        entry["results"] = {}
        entry["grids"] = grids
        entry["num_keys"] = num_keys
        entry["next"] = nxt
        self.current = nxt
        return entry["results"]

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
            tokens = r.tokens.for_call(b, m, dev, "encoder_hidden_states")
            placed.append((tokens, r.recorder._sink.open_call(grids, (m, m))))
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
            placed.append((tokens, ref, ref_bias, r.recorder._sink.open_call(grids, (m, min(m_ref)))))
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
        captures = tuple(CaptureItem(p[1], p[0], r.head_reduce) for r, p in zip(requests, placed)
                         if isinstance(r, CaptureRequest) and name in r.layers)
        loss = None
        for r, p in zip(requests, placed):
            if isinstance(r, LossRequest) and name in r.layers:
                tokens, ref, ref_bias, results = p
                loss = LossItem(results, per_layer(r.reference_states, name), tokens, ref, r.head_reduce,
                                ref_bias, r.keep_maps)
        if value_states is not None or captures or loss is not None:
            plans[name] = LayerPlan(value_states, captures, loss)
    return CallState(owner, plans)


__all__ = ["TokenSpec", "CaptureRequest", "LossRequest", "ValuesRequest", "CaptureItem", "LossItem",
           "LayerPlan", "CallState", "CallSink", "CallStateProtocol", "plan_call", "ACCUMULATE"]
