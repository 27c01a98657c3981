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
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HEAD_REDUCTIONS = ("mean", "none")

SelectLike = Union[torch.Tensor, Sequence[int], None]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of lse, maps and loss: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shapes(named: Sequence[Tuple[str, torch.Tensor]]) -> str:
    """"q: shape=... dtype=... device=..., k: ..." for error messages (built only on error)."""
    return ", ".join(f"{name}: {_describe(t)}" for name, t in named)


def _describe(t: Optional[torch.Tensor]) -> str:
    if t is None:
        return "None"
    return f"shape={tuple(t.shape)} dtype={t.dtype} device={t.device}"


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
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    def summary(self) -> str:
        """One line with every shape, dtype and device, for error messages."""
        return (
            f"q: {_describe(self.q)}, k: {_describe(self.k)}, v: {_describe(self.v)}, "
            f"bias: {_describe(self.bias)}, select: {_describe(self.select)}, "
            f"scale={self.scale:g}, head_reduce={'mean' if self.mean_heads else 'none'}"
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
        select: SelectLike = None,
        head_reduce: str = "mean",
        names: Sequence[str] = ("q", "k", "v", "attn_bias", "select"),
    ) -> "XattnInputs":
        """Check user input and return it in canonical form.

        Args:
            q: [B, H, N, D] queries.
            k: [B, H, M, D] keys.
            v: [B, H, M, Dv] values, or ``None`` for a maps-only pass.
            scale: softmax scale, defaults to ``D ** -0.5``.
            attn_bias: additive per-key bias [B, M], [B, 1, M], [B, 1, 1, M] or [B, H, 1, M].
            select: key indices [S] or [B, S] whose probability columns are returned.
            head_reduce: ``"mean"`` or ``"none"``.
            names: the user-facing argument names, so errors from the reference branch of
                ``subject_attention`` say ``k_ref`` / ``ref_attn_bias`` / ``ref_tokens``.

        Raises:
            TypeError: wrong Python type or dtype.
            ValueError: wrong rank, mismatched sizes or devices, unknown ``head_reduce``.
            IndexError: a ``select`` index outside ``[0, M)``.
        """
        q_name, k_name, v_name, bias_name, select_name = names
        for name, t in ((q_name, q), (k_name, k), (v_name, v)):
            if t is None and name == v_name:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(
                    f"{name} must have 4 dims [B, H, {'N' if name == q_name else 'M'}, D], "
                    f"got shape {tuple(t.shape)}"
                )
            if t.dtype not in SUPPORTED_DTYPES:
                raise TypeError(
                    f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
                )
        tensors = [(q_name, q), (k_name, k)] + ([(v_name, v)] if v is not None else [])
        for name, t in tensors[1:]:
            if t.dtype != q.dtype:
                raise TypeError(f"{name} must have the dtype of {q_name} ({q.dtype}); got {_shapes(tensors)}")
            if t.device != q.device:
                raise ValueError(f"{name} must be on the device of {q_name} ({q.device}); got {_shapes(tensors)}")
        B, H, N, D = q.shape
        if k.shape[0] != B or k.shape[1] != H:
            raise ValueError(f"{k_name} must have batch {B} and {H} heads like {q_name}; got {_shapes(tensors)}")
        if k.shape[3] != D:
            raise ValueError(f"{k_name} must have head dim {D} like {q_name}; got {_shapes(tensors)}")
        M = k.shape[2]
        if M == 0:
            raise ValueError(f"{k_name} must hold at least one key (M >= 1); got {_shapes(tensors)}")
        if D == 0:
            raise ValueError(f"{q_name} must have a head dim >= 1; got {_shapes(tensors)}")
        if v is not None:
            if v.shape[:3] != k.shape[:3]:
                raise ValueError(
                    f"{v_name} must be [B, H, M, Dv] with B, H, M of {k_name}; got {_shapes(tensors)}"
                )
            if v.shape[3] == 0:
                raise ValueError(f"{v_name} must have a value dim >= 1; got {_shapes(tensors)}")

        if scale is None:
            scale_f = D ** -0.5
        else:
            if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
                raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
            scale_f = float(scale)
            if not math.isfinite(scale_f):
                raise ValueError(f"scale must be finite, got {scale_f}")

        if not isinstance(head_reduce, str) or head_reduce not in HEAD_REDUCTIONS:
            raise ValueError(f"head_reduce must be one of {HEAD_REDUCTIONS}, got {head_reduce!r}")

        bias = _normalize_bias(attn_bias, B, H, M, q, bias_name)
        sel = _normalize_select(select, B, M, q.device, select_name)
        return cls(q=q, k=k, v=v, bias=bias, select=sel, scale=scale_f,
                   mean_heads=head_reduce == "mean")


def _normalize_bias(
    bias: Optional[torch.Tensor], B: int, H: int, M: int, q: torch.Tensor, name: str
) -> Optional[torch.Tensor]:
    """[B, M] | [B, 1, M] | [B, 1, 1, M] | [B, H, 1, M] -> [B, H, M] view in the accumulation dtype."""
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(bias).__name__}")
    if not bias.is_floating_point():
        raise TypeError(
            f"{name} must be an additive float bias (0 keeps a key, -inf or -10000 masks it), "
            f"got dtype {bias.dtype}; convert a boolean keep-mask m with (~m) * -10000.0"
        )
    if bias.device != q.device:
        raise ValueError(f"{name} must be on the device of q ({q.device}), got {bias.device}")
    expected = f"[B, M], [B, 1, M], [B, 1, 1, M] or [B, H, 1, M] with B={B}, H={H}, M={M}"
    shape = tuple(bias.shape)
    if bias.dim() not in (2, 3, 4) or shape[0] not in (1, B) or shape[-1] != M:
        raise ValueError(f"{name} must have shape {expected}; got {shape}")
    if bias.dim() >= 3 and shape[-2] != 1:
        raise ValueError(
            f"{name} must not depend on the query (a cross-attention padding bias has a 1 in "
            f"dim -2); expected {expected}; got {shape}"
        )
    if bias.dim() == 4 and shape[1] not in (1, H):
        raise ValueError(f"{name} must have shape {expected}; got {shape}")
    per_head = bias.dim() == 4 and shape[1] == H
    b3 = bias.reshape(shape[0], H if per_head else 1, M)
    return b3.to(accumulation_dtype(q.dtype)).expand(B, H, M)


def _normalize_select(
    select: SelectLike, B: int, M: int, device: torch.device, name: str
) -> Optional[torch.Tensor]:
    """[S] or [B, S] integer indices (tensor or sequence) -> [B, S] int64 on ``device``."""
    if select is None:
        return None
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
    if isinstance(select, torch.Tensor) and not _is_tracing(sel) and sel.numel() > 0:
        # One host sync when select lives on a GPU; pass a list or a CPU tensor to avoid it.
        _check_range(name, int(sel.min()), int(sel.max()), M)
    sel = sel.to(device=device, dtype=torch.int64, non_blocking=True)
    if sel.dim() == 1:
        sel = sel.unsqueeze(0).expand(B, -1)
    return sel


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
