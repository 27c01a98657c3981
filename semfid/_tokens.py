"""Token (key) selections: the indices whose attention-map columns an op returns or compares.

:class:`TokenSelection` is a token list validated once (e.g. per UNet call) and reused by many calls
with no further check, copy or host sync; ragged rows carry the per-column loss weights 1/S_b.
The range checks here are shared by every op's validation (:mod:`semfid._inputs`).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch


@dataclass(frozen=True)
class TokenSelection:
    r"""Key (token) indices per batch row, validated once and reused without further checks.

    Build it with :meth:`build` (e.g. once per UNet call) and pass it as ``select`` / ``tokens`` /
    ``ref_tokens``: the ops then only compare its sizes with the call's (no range check, no copy,
    no host sync).

    Attributes:
        index (`torch.Tensor` [B, S] int64): the indices, on the device of the ops' inputs (an
            expanded view when one list serves every row). Rows shorter than S (ragged) are padded
            with their own first index.
        weights (`torch.Tensor` [B, S] float32 or `None`): per-column weight of the subject loss,
            ``1/S_b`` on row b's own columns and 0 on its padding; ``None`` when every row has S
            tokens (each column then weighs 1/S).
        lengths (`tuple[int, ...]`): tokens per row, S_b.
        max_index (`int`): the largest index, for the range check against a call's key count.
    """

    index: torch.Tensor
    weights: Optional[torch.Tensor]
    lengths: Tuple[int, ...]
    max_index: int

    @property
    def batch(self) -> int:
        return self.index.shape[0]

    @property
    def width(self) -> int:
        """S: columns per row (the longest row's token count)."""
        return self.index.shape[1]

    @property
    def ragged(self) -> bool:
        return self.weights is not None

    @property
    def device(self) -> torch.device:
        return self.index.device

    def weights_as(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """``weights`` computed afresh in ``dtype`` (float64 inputs want 1/S_b to float64)."""
        if self.weights is None:
            return None
        return _loss_weights(self.lengths, self.width, dtype).to(self.device, non_blocking=True)

    def valid_mask(self) -> torch.Tensor:
        """[B, S] bool: True on each row's own columns, False on ragged padding."""
        if self.weights is None:
            return torch.ones(self.index.shape, dtype=torch.bool, device=self.index.device)
        return self.weights > 0

    @classmethod
    def build(
        cls,
        tokens: "TokensLike",
        *,
        batch: int,
        num_keys: int,
        device: Union[torch.device, str, None] = None,
        name: str = "tokens",
    ) -> "TokenSelection":
        """Validate ``tokens`` for ``batch`` rows of ``num_keys`` keys and place them on ``device``.

        Args:
            tokens: [S] (shared by every row) or [B, S] integer tensor / list, or a ragged list of
                B per-row lists (each non-empty), or a ``TokenSelection`` (checked, returned as is
                when it already lives on ``device``).
            batch: B, the number of rows.
            num_keys: M; every index must lie in [0, M).
            device: where the indices go (defaults to the tensor's device, else CPU).
            name: the argument name used in error messages.

        Raises:
            TypeError: not integers. ValueError: wrong rank, row count or an empty row.
            IndexError: an index outside [0, M).
        """
        if isinstance(tokens, TokenSelection):
            tokens.check(batch, num_keys, name)
            if device is None or tokens.device == torch.device(device):
                return tokens
            return cls(tokens.index.to(device), None if tokens.weights is None else tokens.weights.to(device),
                       tokens.lengths, tokens.max_index)
        if isinstance(tokens, (list, tuple)) and tokens and all(isinstance(r, (list, tuple)) for r in tokens):
            lengths = tuple(len(r) for r in tokens)
            if len(set(lengths)) > 1:
                return cls._ragged(tokens, lengths, batch, num_keys, device, name)
        sel = _normalize_select(tokens, batch, num_keys, device, name, check_range=False)
        hi = _checked_max(tokens, sel, num_keys, name)
        return cls(sel, None, (sel.shape[1],) * batch, hi)

    @classmethod
    def _ragged(cls, rows, lengths, batch, num_keys, device, name) -> "TokenSelection":
        if len(rows) != batch:
            raise ValueError(f"{name} must have one row per batch item ([B={batch}, S]), got {len(rows)} rows")
        flat = [x for row in rows for x in row]
        if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in flat):
            raise TypeError(f"{name} must hold integer key indices, got {rows!r}")
        if min(lengths) == 0:
            raise ValueError(f"{name}: every row must select at least one key, got row lengths {list(lengths)}")
        _check_range(name, min(flat), max(flat), num_keys)
        width = max(lengths)
        padded = [list(r) + [r[0]] * (width - len(r)) for r in rows]
        device = torch.device("cpu") if device is None else device
        index = torch.tensor(padded, dtype=torch.int64).to(device, non_blocking=True)
        w = _loss_weights(lengths, width, torch.float32).to(device, non_blocking=True)
        return cls(index, w, lengths, max(flat))

    def check(self, batch: int, num_keys: int, name: str) -> None:
        """Sizes of this selection against a call with ``batch`` rows and ``num_keys`` keys."""
        if self.batch != batch:
            raise ValueError(f"{name} was built for batch {self.batch}, but the inputs have batch {batch}")
        if self.max_index >= num_keys:
            raise IndexError(
                f"{name} indices must lie in [0, {num_keys}) (M = number of keys), got max {self.max_index}"
            )


def _loss_weights(lengths: Sequence[int], width: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, width]: 1/S_b on row b's first S_b columns, 0 on its padding."""
    return torch.tensor([[1.0 / n] * n + [0.0] * (width - n) for n in lengths], dtype=dtype)


TokensLike = Union[torch.Tensor, Sequence[int], Sequence[Sequence[int]], TokenSelection, None]


def _selection(tokens, B: int, M: int, device: torch.device, name: str) -> TokenSelection:
    """``tokens`` as a TokenSelection on ``device``; a TokenSelection already there costs only a size check."""
    if tokens is None:
        raise ValueError(f"{name} must give key indices ([S], [B, S] or per-row lists), got None")
    if isinstance(tokens, TokenSelection):
        tokens.check(B, M, name)
        if tokens.device != device:
            raise ValueError(f"{name} must be on the device of q ({device}), got {tokens.device}")
        return tokens
    return TokenSelection.build(tokens, batch=B, num_keys=M, device=device, name=name)


def _normalize_select(
    select, B: int, M: int, device: Optional[torch.device], name: str, check_range: bool = True
) -> torch.Tensor:
    """[S] or [B, S] integer indices (tensor or sequence) -> [B, S] int64 on ``device``."""
    if isinstance(select, torch.Tensor):
        sel = select
        if sel.is_floating_point() or sel.is_complex() or sel.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer key indices (int64), got dtype {sel.dtype}")
    elif isinstance(select, (list, tuple)):
        flat = [x for row in select for x in (row if isinstance(row, (list, tuple)) else [row])]
        if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in flat):
            raise TypeError(f"{name} must hold integer key indices, got {select!r}")
        if flat:  # range checked on the Python ints: no tensor reduction, no device sync
            _check_range(name, min(flat), max(flat), M)
        if flat and any(isinstance(r, (list, tuple)) for r in select) and not all(
                isinstance(r, (list, tuple)) for r in select):
            raise ValueError(f"{name} must be a flat list [S], a list of per-row lists [B, S], got {select!r}")
        sel = torch.tensor(select, dtype=torch.int64)
    else:
        raise TypeError(
            f"{name} must be an int64 tensor [S] / [B, S] or a list of ints, got {type(select).__name__}"
        )
    if sel.dim() not in (1, 2):
        raise ValueError(f"{name} must have shape [S] or [B, S], got {tuple(sel.shape)}")
    if sel.dim() == 2 and sel.shape[0] != B:
        raise ValueError(f"{name} must have one row per batch item ([B={B}, S]), got {tuple(sel.shape)}")
    if sel.shape[-1] == 0:
        raise ValueError(f"{name} must select at least one key, got shape {tuple(sel.shape)}")
    if check_range and isinstance(select, torch.Tensor) and not _is_tracing(sel) and sel.numel() > 0:
        # One host sync when select lives on a GPU; pass a list or a CPU tensor to avoid it.
        _check_range(name, int(sel.min()), int(sel.max()), M)
    sel = sel.to(device=device if device is not None else sel.device, dtype=torch.int64, non_blocking=True)
    if sel.dim() == 1:
        sel = sel.unsqueeze(0).expand(B, -1)
    return sel


def _checked_max(tokens, sel: torch.Tensor, M: int, name: str) -> int:
    """Range-check normalised indices ``sel`` (from ``tokens``) and return their maximum as an int.

    Lists are checked on Python ints; a tensor costs one reduction (and a host sync on a GPU), done
    once when a selection is built. Under tracing the maximum is unknown and taken as 0 (a traced
    graph cannot check data; the kernels clamp nothing, so validate outside the compiled region)."""
    if isinstance(tokens, (list, tuple)):
        flat = [x for row in tokens for x in (row if isinstance(row, (list, tuple)) else [row])]
        return max(flat)
    if _is_tracing(sel):
        return 0
    lo, hi = torch.stack(torch.aminmax(tokens)).tolist()  # one reduction, one host sync
    _check_range(name, lo, hi, M)
    return hi


def _check_range(name: str, lo: int, hi: int, M: int) -> None:
    if lo < 0 or hi >= M:
        raise IndexError(
            f"{name} indices must lie in [0, {M}) (M = number of keys), got min {lo}, max {hi}"
        )


def _is_tracing(t: torch.Tensor) -> bool:
    """True under torch.compile / fake tensors, where data-dependent checks are impossible."""
    if torch.compiler.is_compiling():
        return True
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)
