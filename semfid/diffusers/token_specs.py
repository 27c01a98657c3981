"""Token lists of a ``with`` block: checked at block entry, placed per call, bounded per key set.

:class:`TokenSpec` is a token argument (``tokens``, ``ref_tokens``, ``ip_tokens``) validated once at
block entry and put on the model's device; per UNet call :meth:`TokenSpec.place` expands it to the
call's batch and :func:`bound` fits it to a key count (a range check eagerly, a clamp when traced).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Tuple

import torch

from .._inputs import TokenSelection

Tensor = torch.Tensor


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

    def place(self, batch: int, device: torch.device) -> TokenSelection:
        """This call's [B, S] selection on ``device``, its rows checked against ``batch`` but its
        indices not yet against a key count (:func:`bound`)."""
        sel = self.selection
        if not self.shared and sel.batch != batch:
            raise ValueError(
                f"{self.arg} has {sel.batch} rows but the UNet call has batch {batch}: give [S] "
                f"(shared) or [B={batch}, S] (under classifier-free guidance B counts both halves)"
            )
        index, weights = sel.index, sel.weights
        if index.device != device:  # the model moved since block entry
            index = index.to(device, non_blocking=True)
            weights = None if weights is None else weights.to(device, non_blocking=True)
        if self.shared:
            index = index.expand(batch, -1)
        lengths = sel.lengths * batch if self.shared else sel.lengths
        return TokenSelection(index, weights, lengths, self.max_index)

    def for_call(self, batch: int, num_keys: int, device: torch.device, states_arg: str) -> TokenSelection:
        """Check against one call's sizes and give its selection on ``device`` (once per call).

        Traced (``torch.compile``): reads only static values; see :func:`bound`.
        """
        return bound(self.place(batch, device), num_keys,
                     lambda hi: check_token_range(hi, num_keys, self.arg, states_arg))


def bound(sel: TokenSelection, num_keys: int, check: Callable[[int], None]) -> TokenSelection:
    """``sel`` for ``num_keys`` keys: eagerly, ``check(sel.max_index)`` raises if it is too large.

    Traced (``torch.compile``) the largest index is a per-step value that must not be read: the
    indices are clamped to ``num_keys - 1`` in the graph, so a list too long for this call cannot
    read past the keys, and the range is checked when the recorder is read (the call records
    ``num_keys``); ``max_index`` becomes that bound, the same every step.
    """
    if not torch.compiler.is_compiling():
        check(sel.max_index)
        return sel
    return TokenSelection(sel.index.clamp(max=num_keys - 1), sel.weights, sel.lengths, num_keys - 1)


def check_token_range(hi: int, length: int, arg: str, states_arg: str) -> None:
    if hi >= length:
        raise ValueError(
            f"{arg} must index the {length} text tokens of {states_arg} (0 ... {length - 1}), "
            f"got index {hi}"
        )


__all__ = ["TokenSpec", "bound", "check_token_range"]
