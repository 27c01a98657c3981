"""Validation and normalisation of the inputs of the fused cross-attention ops.

Every public op goes through :meth:`XattnInputs.validate` exactly once. It turns user input into the
one canonical form all backends receive, or raises ``ValueError`` / ``TypeError`` / ``IndexError``
naming the argument and what was expected (never an ``assert``: those vanish under ``python -O``).

Canonical form handed to a backend:

* ``q``  [B, H, N, D], ``k`` [B, H, M, D], ``v`` [B, H, M, Dv] or ``None`` (maps-only pass);
  any strides, one floating dtype, one device.
* ``bias`` [B, H, M] float32 (float64 for float64 inputs), usually an expanded view with stride 0
  over the heads, or ``None``.
* ``select`` [B, S] int64 on the device of ``q`` (an expanded view when the user gave [S]), or ``None``.
* ``scale`` a Python float; ``mean_heads`` a bool (``head_reduce == "mean"``).

:class:`SubjectInputs` adds the reference keys ``k_ref`` [B, H, M_ref, D], ``ref_bias`` [B, H, M_ref],
``ref_tokens`` [B, S] and ``weights`` [B, S] (the per-column loss weight of ragged rows, ``None`` for
rectangular rows, where every column weighs 1/S). :class:`TokenSelection` is a token list validated
once (e.g. per UNet call) and reused by many calls with no further check, copy or host sync.

The checks of single arguments live in :mod:`semfid._checks`.

Joint key sets (diffusion transformers, OP_CONTRACT of issue 21): ``map_start`` / ``map_stop``
(Python ints, default ``0`` / ``N``) are the queries the maps and the loss cover (``out`` covers
all N); :class:`SubjectInputs` adds ``seg_start`` / ``seg_stop`` (default ``0`` / ``M``), the keys
``k[:, :, seg_start:seg_stop]`` that ``k_ref`` replaces in the reference key sequence
``cat(k[:, :, :seg_start], k_ref, k[:, :, seg_stop:])`` on which ``ref_tokens`` index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from ._checks import (  # noqa: F401  (HEAD_REDUCTIONS, SUPPORTED_DTYPES, accumulation_dtype: re-exported)
    HEAD_REDUCTIONS,
    SUPPORTED_DTYPES,
    _check_attention_tensors,
    _describe,
    _int_range,
    _mean_heads,
    _normalize_bias,
    _resolve_scale,
    _resolved,
    accumulation_dtype,
)
from ._tokens import TokenSelection, TokensLike, _selection  # noqa: F401  (re-exported)

@dataclass(frozen=True)
class XattnInputs:
    """The canonical, validated inputs of one fused cross-attention call (see module docstring)."""

    q: torch.Tensor
    k: torch.Tensor
    v: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    select: Optional[torch.Tensor]
    scale: float
    mean_heads: bool
    #: The validated selection behind ``select`` (its ``lengths`` tell ragged padding), or None.
    selection: Optional[TokenSelection] = None
    #: Queries map_start..map_stop-1 get maps (None at construction: 0 / N; always ints after).
    map_start: int = 0
    map_stop: Optional[int] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "map_start", _resolved(self.map_start, 0))
        object.__setattr__(self, "map_stop", _resolved(self.map_stop, self.q.shape[2]))

    # ---- sizes, for backends' not_supported_reasons -------------------------------------------
    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def heads(self) -> int:
        return self.q.shape[1]

    @property
    def num_queries(self) -> int:
        return self.q.shape[2]

    @property
    def num_keys(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def value_dim(self) -> int:
        return 0 if self.v is None else self.v.shape[3]

    @property
    def num_selected(self) -> int:
        return 0 if self.select is None else self.select.shape[1]

    @property
    def num_map_queries(self) -> int:
        """map_stop - map_start: the query rows of the maps (and of the subject loss)."""
        return self.map_stop - self.map_start

    @property
    def joint_ranges(self) -> bool:
        """Whether the maps cover only part of the queries (or, for the subject op, the
        reference replaces only part of the keys): the joint key-set layouts of issue 21."""
        return (self.map_start, self.map_stop) != (0, self.q.shape[2])

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def needs_grad(self) -> bool:
        return any(t is not None and t.requires_grad for t in (self.q, self.k, self.v))

    def summary(self) -> str:
        """One line with every shape, dtype and device, for error messages."""
        return (
            f"q: {_describe(self.q)}, k: {_describe(self.k)}, v: {_describe(self.v)}, "
            f"bias: {_describe(self.bias)}, select: {_describe(self.select)}, "
            f"scale={self.scale:g}, head_reduce={'mean' if self.mean_heads else 'none'}, "
            f"map_queries=({self.map_start}, {self.map_stop})"
        )

    # ---- construction -----------------------------------------------------------------------------
    @classmethod
    def validate(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        v: Optional[torch.Tensor],
        *,
        scale: Optional[float] = None,
        attn_bias: Optional[torch.Tensor] = None,
        select: TokensLike = None,
        head_reduce: str = "mean",
        map_queries: Optional[Tuple[int, int]] = None,
        names: Sequence[str] = ("q", "k", "v", "attn_bias", "select"),
    ) -> "XattnInputs":
        """Check user input and return it in canonical form.

        Args:
            q: [B, H, N, D] queries.
            k: [B, H, M, D] keys.
            v: [B, H, M, Dv] values, or ``None`` for a maps-only pass.
            scale: softmax scale, defaults to ``D ** -0.5``.
            attn_bias: additive per-key bias [B, M], [B, 1, M], [B, 1, 1, M] or [B, H, 1, M].
            select: key indices [S], [B, S], ragged per-row lists or a :class:`TokenSelection`.
            head_reduce: ``"mean"`` or ``"none"``.
            map_queries: ``(start, stop)`` queries the maps cover (default all N).
            names: the user-facing argument names used in error messages.

        Raises:
            TypeError: wrong Python type or dtype.
            ValueError: wrong rank, mismatched sizes or devices, unknown ``head_reduce``,
                ``map_queries`` outside ``[0, N]``.
            IndexError: a ``select`` index outside ``[0, M)``.
        """
        q_name, k_name, v_name, bias_name, select_name = names
        _check_attention_tensors(q, k, v, (q_name, k_name, v_name))
        B, H, _, D = q.shape
        M = k.shape[2]
        scale_f = _resolve_scale(scale, D)
        mean_heads = _mean_heads(head_reduce)
        bias = _normalize_bias(attn_bias, B, H, M, q, bias_name)
        selection = None if select is None else _selection(select, B, M, q.device, select_name)
        map_start, map_stop = _int_range(map_queries, q.shape[2], "map_queries", "queries (N)")
        return cls(q=q, k=k, v=v, bias=bias, select=None if selection is None else selection.index,
                   scale=scale_f, mean_heads=mean_heads, selection=selection,
                   map_start=map_start, map_stop=map_stop)


@dataclass(frozen=True)
class SubjectInputs:
    """The canonical, validated inputs of one fused subject-wise attention call.

    ``q``, ``k``, ``v``, ``bias`` as in :class:`XattnInputs`; ``k_ref`` [B, H, M_ref, D] and
    ``ref_bias`` [B, H, M_ref] (or None) for the reference prompt; ``tokens`` / ``ref_tokens``
    [B, S] int64; ``weights`` [B, S] float32 loss weights of ragged rows (None: 1/S each);
    ``map_start`` / ``map_stop`` the queries of the maps and the loss, ``seg_start`` / ``seg_stop``
    the keys of ``k`` that ``k_ref`` replaces (see the module docstring; None at construction means
    the full range, ints after).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_ref: torch.Tensor
    bias: Optional[torch.Tensor]
    ref_bias: Optional[torch.Tensor]
    tokens: torch.Tensor
    ref_tokens: torch.Tensor
    weights: Optional[torch.Tensor]
    scale: float
    mean_heads: bool
    detach_reference: bool
    return_maps: bool
    selection: Optional[TokenSelection] = None
    map_start: int = 0
    map_stop: Optional[int] = None
    seg_start: int = 0
    seg_stop: Optional[int] = None

    def __post_init__(self) -> None:
        XattnInputs.__post_init__(self)
        object.__setattr__(self, "seg_start", _resolved(self.seg_start, 0))
        object.__setattr__(self, "seg_stop", _resolved(self.seg_stop, self.k.shape[2]))

    batch = XattnInputs.batch
    heads = XattnInputs.heads
    num_queries = XattnInputs.num_queries
    head_dim = XattnInputs.head_dim
    value_dim = XattnInputs.value_dim
    device = XattnInputs.device
    dtype = XattnInputs.dtype
    num_map_queries = XattnInputs.num_map_queries

    @property
    def num_ref_keys(self) -> int:
        """Length of the reference key sequence: M - (seg_stop - seg_start) + M_ref."""
        return self.k.shape[2] - (self.seg_stop - self.seg_start) + self.k_ref.shape[2]

    @property
    def num_keys(self) -> int:
        """max(M, reference sequence length): what a backend's key limit must hold."""
        return max(self.k.shape[2], self.num_ref_keys)

    @property
    def joint_ranges(self) -> bool:
        """Non-default ``map_queries`` or ``ref_segment`` (see :attr:`XattnInputs.joint_ranges`)."""
        return XattnInputs.joint_ranges.fget(self) or (self.seg_start, self.seg_stop) != (0, self.k.shape[2])

    @property
    def num_selected(self) -> int:
        return self.tokens.shape[1]

    @property
    def needs_grad(self) -> bool:
        tensors = (self.q, self.k, self.v) + (() if self.detach_reference else (self.k_ref,))
        return any(t.requires_grad for t in tensors)

    def summary(self) -> str:
        return (
            f"q: {_describe(self.q)}, k: {_describe(self.k)}, v: {_describe(self.v)}, "
            f"k_ref: {_describe(self.k_ref)}, tokens: {_describe(self.tokens)}, "
            f"ref_tokens: {_describe(self.ref_tokens)}, ragged={self.weights is not None}, "
            f"scale={self.scale:g}, head_reduce={'mean' if self.mean_heads else 'none'}, "
            f"detach_reference={self.detach_reference}, "
            f"map_queries=({self.map_start}, {self.map_stop}), "
            f"ref_segment=({self.seg_start}, {self.seg_stop})"
        )

    @classmethod
    def validate(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_ref: torch.Tensor,
        *,
        tokens: TokensLike,
        ref_tokens: TokensLike = None,
        scale: Optional[float] = None,
        attn_bias: Optional[torch.Tensor] = None,
        ref_attn_bias: Optional[torch.Tensor] = None,
        head_reduce: str = "mean",
        detach_reference: bool = True,
        return_maps: bool = False,
        map_queries: Optional[Tuple[int, int]] = None,
        ref_segment: Optional[Tuple[int, int]] = None,
    ) -> "SubjectInputs":
        """Check the arguments of :func:`semfid.subject_attention` once; errors name the argument."""
        if v is None:
            raise TypeError("v must be a torch.Tensor [B, H, M, Dv], got None")
        for flag, value in (("detach_reference", detach_reference), ("return_maps", return_maps)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be a bool, got {type(value).__name__}")
        if tokens is None:
            raise ValueError("tokens must give the target-prompt token indices ([S] or [B, S]), got None")
        _check_attention_tensors(q, k, v, ("q", "k", "v"))
        _check_attention_tensors(q, k_ref, None, ("q", "k_ref", "v"))
        B, H, _, D = q.shape
        M, M_ref = k.shape[2], k_ref.shape[2]
        scale_f = _resolve_scale(scale, D)
        mean_heads = _mean_heads(head_reduce)
        bias = _normalize_bias(attn_bias, B, H, M, q, "attn_bias")
        ref_bias = _normalize_bias(ref_attn_bias, B, H, M_ref, q, "ref_attn_bias")
        map_start, map_stop = _int_range(map_queries, q.shape[2], "map_queries", "queries (N)")
        seg_start, seg_stop = _int_range(ref_segment, M, "ref_segment", "keys of k (M)")
        ref_len = M - (seg_stop - seg_start) + M_ref  # the reference key sequence
        target = _selection(tokens, B, M, q.device, "tokens")
        if ref_tokens is None:
            if target.max_index >= ref_len:
                raise IndexError(
                    f"ref_tokens defaults to tokens, whose indices must then lie in [0, {ref_len}) "
                    f"(the reference key sequence: M - (ref_segment stop - start) + M_ref), "
                    f"got max {target.max_index}"
                )
            reference = target
        else:
            reference = _selection(ref_tokens, B, ref_len, q.device, "ref_tokens")
        if reference.lengths != target.lengths:
            if not (target.ragged or reference.ragged):
                raise ValueError(f"ref_tokens must select as many tokens as tokens "
                                 f"({target.width}), got {reference.width}")
            raise ValueError("ref_tokens must select as many tokens per row as tokens "
                             f"({list(target.lengths)}), got {list(reference.lengths)}")
        weights = target.weights
        if weights is not None and q.dtype == torch.float64:  # 1/S_b to float64 precision there
            weights = target.weights_as(torch.float64)
        return cls(q=q, k=k, v=v, k_ref=k_ref, bias=bias, ref_bias=ref_bias, tokens=target.index,
                   ref_tokens=reference.index, weights=weights, scale=scale_f,
                   mean_heads=mean_heads, detach_reference=detach_reference, return_maps=return_maps,
                   selection=target, map_start=map_start, map_stop=map_stop, seg_start=seg_start,
                   seg_stop=seg_stop)
