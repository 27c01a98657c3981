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
    """Token positions checked at block entry, kept on the CPU until a UNet call places them.

    Attributes:
        host (`TokenSelection`): the indices on the CPU, [1, S] when ``shared`` else [B, S] (ragged
            rows padded, with weights).
        shared (`bool`): one list for every row of any batch ([S]).
        arg (`str`): the argument name for error messages.
    """

    host: TokenSelection
    shared: bool
    arg: str

    @property
    def max_index(self) -> int:
        return self.host.max_index

    @property
    def lengths(self) -> Tuple[int, ...]:
        return self.host.lengths

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

    def for_call(self, batch: int, num_keys: int, device: torch.device, states_arg: str) -> TokenSelection:
        """Check against one UNet call and place on ``device`` (once per call, not per layer)."""
        if not self.shared and self.host.batch != batch:
            raise ValueError(
                f"{self.arg} has {self.host.batch} rows but the UNet call has batch {batch}: give [S] "
                f"(shared) or [B={batch}, S] (under classifier-free guidance B counts both halves)"
            )
        check_token_range(self.max_index, num_keys, self.arg, states_arg)
        host = self.host
        if self.shared:
            host = TokenSelection(host.index.expand(batch, -1), None, host.lengths * batch, host.max_index)
        return TokenSelection.build(host, batch=batch, num_keys=num_keys, device=device, name=self.arg)


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
    request: CaptureRequest
    tokens: TokenSelection  # on the call's device
    head_reduce: str


@dataclass(frozen=True, eq=False)
class LossItem:
    request: LossRequest
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


class CallState:
    """The plans of one UNet call; immutable except for which (item, layer) pairs were recorded,
    so that a gradient-checkpoint recompute of the call records nothing a second time."""

    def __init__(self, owner: object, plans: Dict[str, LayerPlan], grids: Dict[str, Optional[Tuple[int, int]]],
                 call_index: Dict[int, int]):
        self.owner = owner
        self.plans = plans
        self.grids = grids
        self._call_index = call_index  # id(request) -> index of this call in its block
        self._recorded = set()

    def record(self, item, name: str, value: Tensor, maps: Optional[Tensor] = None) -> None:
        key = (id(item.request), name)
        if key in self._recorded:  # gradient-checkpoint recompute of this call: already stored
            return
        self._recorded.add(key)
        rec = item.request.recorder
        rec._store(self._call_index[id(item.request)], name, value, self.grids.get(name), maps)


def plan_call(owner: object, requests: Sequence[Request], ehs: Tensor,
              grids: Dict[str, Optional[Tuple[int, int]]]) -> CallState:
    """Validate ``requests`` against one call's ``encoder_hidden_states`` [B, M, C]; build the plans."""
    b, m, dev = ehs.shape[0], ehs.shape[1], ehs.device
    placed = {}
    for r in requests:
        for states in states_of(getattr(r, "value_states", None)):
            check_states_for_call(states, "value_states", ehs, same_length=True)
        if isinstance(r, CaptureRequest):
            placed[id(r)] = (r.tokens.for_call(b, m, dev, "encoder_hidden_states"),)
        elif isinstance(r, LossRequest):
            tokens = r.tokens.for_call(b, m, dev, "encoder_hidden_states")
            m_ref = {s.shape[1] for s in states_of(r.reference_states)}
            for states in states_of(r.reference_states):
                check_states_for_call(states, "reference_states", ehs, same_length=False)
            if r.ref_bias is not None and r.ref_bias.shape[0] not in (1, b):
                raise ValueError(f"ref_attention_mask must have batch 1 or {b}, got batch {r.ref_bias.shape[0]}")
            ref = tokens if r.ref_tokens is r.tokens and m_ref == {m} else \
                r.ref_tokens.for_call(b, min(m_ref), dev, "reference_states")
            ref_bias = None if r.ref_bias is None else r.ref_bias.to(dev, non_blocking=True)
            placed[id(r)] = (tokens, ref, ref_bias)

    names = set().union(*(r.layers for r in requests))
    plans: Dict[str, LayerPlan] = {}
    for name in names:
        value_states = None
        for r in reversed(requests):  # innermost block giving values for this layer wins
            vs = getattr(r, "value_states", None)
            if vs is not None and name in r.layers:
                value_states = per_layer(vs, name)
                if value_states is not None:
                    break
        captures = tuple(CaptureItem(r, placed[id(r)][0], r.head_reduce) for r in requests
                         if isinstance(r, CaptureRequest) and name in r.layers)
        loss = None
        for r in requests:
            if isinstance(r, LossRequest) and name in r.layers:
                tokens, ref, ref_bias = placed[id(r)]
                loss = LossItem(r, per_layer(r.reference_states, name), tokens, ref, r.head_reduce,
                                ref_bias, r.keep_maps)
        if value_states is not None or captures or loss is not None:
            plans[name] = LayerPlan(value_states, captures, loss)
    index = {}
    for r in requests:
        if r.recorder is not None:
            index[id(r)] = r.recorder._new_call()
    return CallState(owner, plans, grids, index)


__all__ = ["TokenSpec", "CaptureRequest", "LossRequest", "ValuesRequest", "CaptureItem", "LossItem",
           "LayerPlan", "CallState", "CallStateProtocol", "plan_call", "ACCUMULATE"]
