"""The contract every semfid backend implements (xformers-style: declare support, explain refusals).

A backend computes one fused cross-attention pass and its backward on canonical inputs
(:class:`semfid._inputs.XattnInputs`):

forward(q, k, v, bias, select, scale, mean_heads) -> (out, lse, maps)
    q [B, H, N, D], k [B, H, M, D], v [B, H, M, Dv] or None, bias [B, H, M] or None,
    select [B, S] int64 or None.
    P = softmax(q kᵀ · scale + bias) over the M keys (a row whose keys are all -inf gives P = 0).
    out  [B, H, N, Dv] in q.dtype = P v            (an empty tensor when v is None)
    lse  [B, H, N] fp32 (fp64 for fp64 inputs), natural log of Σ exp(logits); +inf for a row
         whose keys are all masked, so that exp(logit - lse) recomputes P = 0 in backward.
    maps [B, H, N, S] (mean_heads=False) or [B, N, S] (mean_heads=True), fp32 (fp64 for fp64),
         = P[..., select] (an empty tensor when select is None).

backward(q, k, v, bias, select, scale, mean_heads, out, lse, dout, dmaps) -> (dq, dk, dv)
    dout like out or None (no gradient flows into out), dmaps like maps or None.
    dq, dk like q, k; dv like v (an empty tensor when v is None). The backward of a pass must
    only need what forward saved: q, k, v, bias, select, out and lse (never P).

The lse format is shared by every backend, so a forward from one backend and a backward from
another agree; still, the dispatcher picks the backend once at forward time and reuses it.
"""

from __future__ import annotations

from typing import ClassVar, FrozenSet, List, Optional, Tuple

import torch

from .._inputs import XattnInputs, accumulation_dtype

ForwardResult = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
BackwardResult = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@torch.compiler.assume_constant_result
def _unavailable_reason_of(cls: type) -> Optional[str]:
    """``cls.unavailable_reason()``, evaluated eagerly even under ``torch.compile``.

    Availability imports packages (triton, ``semfid._C``) the first time it is asked; Dynamo would
    otherwise trace that import and break the graph. The answer cannot change within a process.
    """
    return cls.unavailable_reason()


def empty_forward_outputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: Optional[torch.Tensor],
    select: Optional[torch.Tensor],
    mean_heads: bool,
) -> ForwardResult:
    """Allocate ``(out, lse, maps)`` with the shapes and dtypes of the forward contract above.

    The single source of these shapes: backends allocate their outputs with it and the fake
    (meta) implementation of ``semfid::xattn_fwd`` returns it.
    """
    B, H, N, _ = q.shape
    acc = accumulation_dtype(q.dtype)
    out = q.new_empty(B, H, N, v.shape[3]) if v is not None else q.new_empty(0)
    lse = q.new_empty(B, H, N, dtype=acc)
    if select is None:
        maps = q.new_empty(0, dtype=acc)
    elif mean_heads:
        maps = q.new_empty(B, N, select.shape[1], dtype=acc)
    else:
        maps = q.new_empty(B, H, N, select.shape[1], dtype=acc)
    return out, lse, maps


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

    # ---- availability -------------------------------------------------------------------------
    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        """Why the backend cannot run at all in this process (missing package/extension), or None."""
        return None

    @classmethod
    def status(cls) -> str:
        """Human-readable validation status, shown by ``python -m semfid.info``."""
        return "validated" if cls.AUTO_DEVICES else "opt-in"

    # ---- support ------------------------------------------------------------------------------
    @classmethod
    def not_supported_reasons(cls, inp: XattnInputs) -> List[str]:
        """Every reason this backend cannot run ``inp``; an empty list means it can."""
        reasons: List[str] = []
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
        return reasons

    # ---- computation --------------------------------------------------------------------------
    @staticmethod
    def forward(
        q: torch.Tensor,
        k: torch.Tensor,
        v: Optional[torch.Tensor],
        bias: Optional[torch.Tensor],
        select: Optional[torch.Tensor],
        scale: float,
        mean_heads: bool,
    ) -> ForwardResult:
        raise NotImplementedError

    @staticmethod
    def backward(
        q: torch.Tensor,
        k: torch.Tensor,
        v: Optional[torch.Tensor],
        bias: Optional[torch.Tensor],
        select: Optional[torch.Tensor],
        scale: float,
        mean_heads: bool,
        out: torch.Tensor,
        lse: torch.Tensor,
        dout: Optional[torch.Tensor],
        dmaps: Optional[torch.Tensor],
    ) -> BackwardResult:
        raise NotImplementedError
