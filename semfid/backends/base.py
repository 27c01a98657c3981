"""The contract every semfid backend implements (xformers-style: declare support, explain refusals).

A backend receives validated input objects from :mod:`semfid._inputs` (the flat positional
signature exists only at the ``torch.library`` boundary in :mod:`semfid.ops`) and implements two
forward/backward pairs. ``acc`` is float32 (float64 for float64 inputs).

``forward(inp: XattnInputs) -> (out, lse, maps)``: one fused pass of cross-attention.
    P = softmax(q kᵀ · scale + bias) over the M keys (a row whose keys are all -inf gives P = 0).
    out  [B, H, N, Dv] in q.dtype = P v, with the memory of a [B, N, H, Dv] tensor (so that
         ``out.transpose(1, 2).reshape(B, N, H * Dv)`` is a view); empty when v is None.
    lse  [B, H, N] acc, natural log of Σ exp(logits); +inf on a row whose keys are all masked.
    maps [B, H, Nm, S] (mean_heads=False) or [B, N, S] (mean_heads=True) acc = P[..., select]
         over the map queries map_start..map_stop-1 (Nm of them; all N by default; empty when
         select is None).
``backward(inp, out, lse, dout, dmaps) -> (dq, dk, dv)``: dout / dmaps may be None; dv is empty
    when v is None. Only what forward saved is used: never P.

``subject_forward(inp: SubjectInputs) -> (out, lse, lse_ref, loss, maps, diff)``: the one-pass
subject-wise attention loss (SeFi-IDE). With A_t = P_t[..., tokens], A_r = P_r[..., ref_tokens]
(P_r from k_ref / ref_bias), both head-averaged when mean_heads, and w the loss weights (1/S when
``inp.weights`` is None)::

    diff    = A_t − A_r                                      [B, Nm, S] or [B, H, Nm, S]
    loss[b] = Σ w[b, s] · diff² / (Nm · (1 if mean_heads else H))       [B] acc

    over the Nm map queries; P_r is the softmax over the reference key sequence
    ``cat(k[:, :, :seg_start], k_ref, k[:, :, seg_stop:])`` (k_ref alone by default), with the
    bias of the keys outside the segment and ref_bias for k_ref.

    out, lse as above; lse_ref [B, H, N] acc when the reference is not detached or the maps are
    per head (empty otherwise). lse and lse_ref only exist for the backend's own backward (the
    op runs backward on the backend of its forward): a backend whose backward recomputes P
    without them (``SUBJECT_SAVES_LSE = False``) returns both empty. maps = A_t when return_maps
    (empty otherwise); diff [B, N, S] acc when mean_heads (the head mean needs every head: saved
    for backward), empty otherwise.
``subject_backward(inp, out, lse, lse_ref, diff, dout, dloss, dmaps) -> (dq, dk, dv, dk_ref)``:
    c = 2 · dloss[b] / (Nm · H_red); G_t = c · w · diff (+ dmaps), G_r = −c · w · diff (only when
    the reference is not detached), each divided by H per head for head-mean maps, scattered onto
    the selected columns of dP_t / dP_r before the softmax backward. dk_ref is empty when detached.

Every gradient has the strides of its input (``torch.empty_like``) and every output the layout
of :func:`empty_forward_outputs` / :func:`empty_subject_outputs`, which the fake (meta)
implementations return too: ``torch.compile`` checks both against each other.
"""

from __future__ import annotations

import functools
from typing import Callable, ClassVar, FrozenSet, List, Optional, Tuple, Union

import torch

from .._inputs import SubjectInputs, XattnInputs, accumulation_dtype

Tensor = torch.Tensor
ForwardResult = Tuple[Tensor, Tensor, Tensor]
BackwardResult = Tuple[Tensor, Tensor, Tensor]
SubjectForwardResult = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
SubjectBackwardResult = Tuple[Tensor, Tensor, Tensor, Tensor]
AnyInputs = Union[XattnInputs, SubjectInputs]


@torch.compiler.assume_constant_result
def _unavailable_reason_of(cls: type) -> Optional[str]:
    """``cls.unavailable_reason()``, evaluated eagerly even under ``torch.compile``.

    Availability imports packages (triton, ``semfid._C``) the first time it is asked; Dynamo would
    otherwise trace that import and break the graph. The answer cannot change within a process.
    """
    return cls.unavailable_reason()


def empty_output(q: Tensor, v: Optional[Tensor]) -> Tensor:
    """``out`` [B, H, N, Dv] in q's dtype over [B, N, H, Dv] memory (empty when v is None)."""
    if v is None:
        return q.new_empty(0)
    B, H, N, _ = q.shape
    return q.new_empty(B, N, H, v.shape[3]).transpose(1, 2)


def empty_maps(q: Tensor, num_selected: int, mean_heads: bool, rows: Optional[int] = None) -> Tensor:
    """[B, Nm, S] (head mean) or [B, H, Nm, S] in the accumulation dtype; Nm = ``rows`` (the map
    queries, default all N)."""
    B, H, N, _ = q.shape
    N = N if rows is None else rows
    acc = accumulation_dtype(q.dtype)
    if mean_heads:
        return q.new_empty(B, N, num_selected, dtype=acc)
    return q.new_empty(B, H, N, num_selected, dtype=acc)


def empty_lse(q: Tensor) -> Tensor:
    B, H, N, _ = q.shape
    return q.new_empty(B, H, N, dtype=accumulation_dtype(q.dtype))


def nothing(q: Tensor, acc: bool = True) -> Tensor:
    """The empty tensor standing for an output that is not produced."""
    return q.new_empty(0, dtype=accumulation_dtype(q.dtype) if acc else q.dtype)


def empty_forward_outputs(
    q: Tensor,
    k: Tensor,
    v: Optional[Tensor],
    select: Optional[Tensor],
    mean_heads: bool,
    map_rows: Optional[int] = None,
) -> ForwardResult:
    """Allocate ``(out, lse, maps)`` with the shapes, dtypes and layouts of ``forward``
    (``map_rows``: map_stop - map_start, default all N).

    The single source of these shapes: backends allocate their outputs with it and the fake
    (meta) implementation of ``semfid::xattn_fwd`` returns it.
    """
    maps = nothing(q) if select is None else empty_maps(q, select.shape[1], mean_heads, map_rows)
    return empty_output(q, v), empty_lse(q), maps


def may_hold_nan(*tensors: Tensor) -> bool:
    """False when none of ``tensors`` holds a NaN, told by one sum each (a NaN makes the sum NaN);
    True when a sum is not finite: a NaN, or an inf / overflow, where :func:`nan_rows` decides."""
    return not all(bool(torch.isfinite(t.detach().sum())) for t in tensors)


def nan_rows(q: Tensor, k: Tensor) -> Tensor:
    """[B, H, N, 1] bool: rows whose logits are NaN (a NaN in the query row or in any key).

    PyTorch's fused CPU attention kernel returns 0 for such rows; the contract propagates NaN
    (silent zeros would hide a diverging run), so paths through that kernel mark them."""
    return torch.isnan(q).any(dim=-1, keepdim=True) | torch.isnan(k).any(dim=-1).any(dim=-1)[..., None, None]


def keeps_lse_ref(mean_heads: bool, detach_reference: bool) -> bool:
    """Whether ``subject_forward`` writes lse_ref: backward recomputes P_r only when gradients
    flow through the reference, or when per-head maps need A_r per head again."""
    return not (mean_heads and detach_reference)


def empty_subject_outputs(
    q: Tensor,
    v: Tensor,
    tokens: Tensor,
    mean_heads: bool,
    detach_reference: bool,
    return_maps: bool,
    saves_lse: bool = True,
    map_rows: Optional[int] = None,
) -> SubjectForwardResult:
    """Allocate ``(out, lse, lse_ref, loss, maps, diff)`` of ``subject_forward`` (see above);
    ``saves_lse`` is the backend's :meth:`BackendBase.subject_saves_lse`, ``map_rows`` the number
    of map queries (default all N)."""
    B, S = q.shape[0], tokens.shape[1]
    acc = accumulation_dtype(q.dtype)
    lse = empty_lse(q) if saves_lse else nothing(q)
    keep_ref = saves_lse and keeps_lse_ref(mean_heads, detach_reference)
    lse_ref = empty_lse(q) if keep_ref else nothing(q)
    maps = empty_maps(q, S, mean_heads, map_rows) if return_maps else nothing(q)
    diff = empty_maps(q, S, True, map_rows) if mean_heads else nothing(q)
    return empty_output(q, v), lse, lse_ref, q.new_empty(B, dtype=acc), maps, diff


def empty_subject_grads(q: Tensor, k: Tensor, v: Tensor, k_ref: Tensor,
                        detach_reference: bool) -> SubjectBackwardResult:
    """``(dq, dk, dv, dk_ref)`` with the strides of their inputs (dk_ref empty when detached)."""
    dk_ref = nothing(q, acc=False) if detach_reference else torch.empty_like(k_ref)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dk_ref


@torch.compiler.assume_constant_result
def _auto_refusal(cls: type, device_type: str, device_index: Optional[int]) -> Optional[str]:
    """``cls.auto_refusal`` for one device, evaluated eagerly even under ``torch.compile``."""
    return _auto_refusal_cached(cls, device_type, device_index)


#: ``verdict_for(name, device) -> Verdict`` (with ``passed`` / ``reason``): the self-test verdicts
#: ``auto`` reads for SELF_VALIDATED backends on a GPU. Set from above by ``semfid/__init__.py``
#: (semfid.selftest imports the backends it tests; the backends never import it).
_VERDICT_SOURCE: Optional[Callable[[str, torch.device], object]] = None


def set_verdict_source(verdict_for: Optional[Callable[[str, torch.device], object]]) -> None:
    """Where ``auto`` gets self-test verdicts from (``semfid.selftest.verdict_for``)."""
    global _VERDICT_SOURCE
    _VERDICT_SOURCE = verdict_for
    _auto_refusal_cached.cache_clear()


@functools.lru_cache(maxsize=None)
def _auto_refusal_cached(cls: type, device_type: str, device_index: Optional[int]) -> Optional[str]:
    if device_type in cls.AUTO_DEVICES:
        return None
    if cls.SELF_VALIDATED and device_type == "cuda":
        if _VERDICT_SOURCE is None:
            return "not validated on cuda (no self-test verdict source: import semfid)"
        verdict = _VERDICT_SOURCE(cls.NAME, torch.device(device_type, device_index))
        if verdict.passed:
            return None
        return f"not validated on this GPU ({verdict.reason}; rerun: python -m semfid.selftest --backend {cls.NAME})"
    return f"not validated on {device_type} (use backend={cls.NAME!r})"


def _has_subject_op(cls: type) -> bool:
    return cls.subject_forward is not BackendBase.subject_forward


class BackendBase:
    """Base class of the backends registered in :mod:`semfid.backends`.

    Subclasses set the class attributes and implement :meth:`forward` / :meth:`backward`;
    they extend :meth:`not_supported_reasons` (call ``super()``) for constraints the
    attributes cannot express.
    """

    NAME: ClassVar[str] = ""
    #: Device types (``"cpu"``, ``"cuda"``) the backend runs on.
    SUPPORTED_DEVICES: ClassVar[FrozenSet[str]] = frozenset()
    SUPPORTED_DTYPES: ClassVar[FrozenSet[torch.dtype]] = frozenset()
    #: Largest head dim (for q/k and v), or None for no limit.
    MAX_HEAD_DIM: ClassVar[Optional[int]] = None
    #: Largest number of keys M per head, or None for no limit.
    MAX_KEYS: ClassVar[Optional[int]] = None
    #: Order tried by ``backend="auto"``: lower first (the fastest backend gets the lowest).
    PRIORITY: ClassVar[int] = 100
    #: Device types on which ``"auto"`` may pick this backend: only those where its test suite has
    #: passed on real hardware. An explicit ``backend=NAME`` works on every supported device.
    AUTO_DEVICES: ClassVar[FrozenSet[str]] = frozenset()
    #: Whether ``"auto"`` may also pick it on a CUDA device where :mod:`semfid.selftest` has a
    #: passing verdict for it (shipped, cached or run on first use).
    SELF_VALIDATED: ClassVar[bool] = False
    #: Whether ``subject_forward`` returns lse / lse_ref (its backward reads them); False for a
    #: backend whose backward recomputes P with a softmax, which then returns both empty.
    SUBJECT_SAVES_LSE: ClassVar[bool] = True
    #: Whether the backend runs non-default ``map_queries`` / ``ref_segment`` (joint key sets).
    JOINT_RANGES: ClassVar[bool] = False

    # ---- availability -------------------------------------------------------------------------
    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        """Why the backend cannot run at all in this process (missing package/extension), or None."""
        return None

    @classmethod
    def auto_refusal(cls, device: torch.device) -> Optional[str]:
        """Why ``backend="auto"`` may not pick this backend on ``device``, or None when it may:
        listed in ``AUTO_DEVICES``, or (``SELF_VALIDATED``) a passing self-test verdict there."""
        return _auto_refusal(cls, device.type, device.index)

    @classmethod
    def status(cls) -> str:
        """Human-readable validation status, shown by ``python -m semfid.info``."""
        return "validated" if cls.AUTO_DEVICES else "opt-in"

    # ---- support ------------------------------------------------------------------------------
    @classmethod
    def not_supported_reasons(cls, inp: AnyInputs) -> List[str]:
        """Every reason this backend cannot run ``inp``; an empty list means it can.

        Reasons may depend only on the fields of :func:`semfid.backends.selection_key` (device,
        dtype, head/value dims, key count, selected count, grad mode): dispatch memoises them."""
        reasons: List[str] = []
        if isinstance(inp, SubjectInputs) and not _has_subject_op(cls):
            reasons.append("no fused subject-wise op")
        missing = _unavailable_reason_of(cls)
        if missing is not None:
            reasons.append(missing)
        if inp.device.type not in cls.SUPPORTED_DEVICES:
            reasons.append(f"device={inp.device.type} (supported: {sorted(cls.SUPPORTED_DEVICES)})")
        if inp.dtype not in cls.SUPPORTED_DTYPES:
            names = sorted(str(d).replace("torch.", "") for d in cls.SUPPORTED_DTYPES)
            reasons.append(f"dtype={inp.dtype} (supported: {names})")
        if cls.MAX_HEAD_DIM is not None:
            for label, dim in (("head_dim", inp.head_dim), ("value_dim", inp.value_dim)):
                if dim > cls.MAX_HEAD_DIM:
                    reasons.append(f"{label}={dim} > {cls.MAX_HEAD_DIM}")
        if cls.MAX_KEYS is not None and inp.num_keys > cls.MAX_KEYS:
            reasons.append(f"num_keys={inp.num_keys} > {cls.MAX_KEYS}")
        if inp.joint_ranges and not cls.JOINT_RANGES:
            reasons.append("map_queries / ref_segment other than the full ranges (joint key sets)")
        return reasons

    @classmethod
    def subject_saves_lse(cls, inp: SubjectInputs) -> bool:
        """Whether ``subject_forward(inp)`` returns lse / lse_ref (``SUBJECT_SAVES_LSE`` unless a
        backend's paths differ per input); the op's fake asks it too."""
        return cls.SUBJECT_SAVES_LSE

    # ---- computation --------------------------------------------------------------------------
    @staticmethod
    def forward(inp: XattnInputs) -> ForwardResult:
        raise NotImplementedError

    @staticmethod
    def backward(inp: XattnInputs, out: Tensor, lse: Tensor, dout: Optional[Tensor],
                 dmaps: Optional[Tensor]) -> BackwardResult:
        raise NotImplementedError

    @staticmethod
    def subject_forward(inp: SubjectInputs) -> SubjectForwardResult:
        raise NotImplementedError

    @staticmethod
    def subject_backward(inp: SubjectInputs, out: Tensor, lse: Tensor, lse_ref: Tensor, diff: Tensor,
                         dout: Optional[Tensor], dloss: Optional[Tensor],
                         dmaps: Optional[Tensor]) -> SubjectBackwardResult:
        raise NotImplementedError

    @classmethod
    def eager_subject(cls, inp: SubjectInputs) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
        """``(out, loss, maps)`` of the whole differentiable subject op from one native call that
        carries its own autograd node, or None (the default): semfid's Python autograd.Function
        then runs :meth:`subject_forward` / :meth:`subject_backward`. Asked in eager mode only
        (traced code goes through the ``semfid::subject_*`` custom ops); ``maps`` is empty unless
        ``inp.return_maps``."""
        return None
