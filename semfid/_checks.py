"""Checks of single arguments of the public ops (used by :mod:`semfid._inputs`): each raises a
``TypeError`` / ``ValueError`` naming the argument and what was expected, or returns the argument
in canonical form."""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HEAD_REDUCTIONS = ("mean", "none")


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


def _check_attention_tensors(q, k, v, names: Sequence[str]) -> None:
    """Types, ranks, dtypes, devices and sizes of q [B, H, N, D], k [B, H, M, D], v [B, H, M, Dv]."""
    q_name, k_name, v_name = names
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
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
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
    if k.shape[2] == 0:
        raise ValueError(f"{k_name} must hold at least one key (M >= 1); got {_shapes(tensors)}")
    if D == 0:
        raise ValueError(f"{q_name} must have a head dim >= 1; got {_shapes(tensors)}")
    if v is not None:
        if v.shape[:3] != k.shape[:3]:
            raise ValueError(f"{v_name} must be [B, H, M, Dv] with B, H, M of {k_name}; got {_shapes(tensors)}")
        if v.shape[3] == 0:
            raise ValueError(f"{v_name} must have a value dim >= 1; got {_shapes(tensors)}")


def _resolve_scale(scale: Optional[float], head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    scale_f = float(scale)
    if not math.isfinite(scale_f):
        raise ValueError(f"scale must be finite, got {scale_f}")
    return scale_f


def _int_range(value, total: int, name: str, what: str) -> Tuple[int, int]:
    """``None`` -> (0, total); a (start, stop) pair of Python ints with 0 <= start <= stop <= total
    -> itself; anything else raises a TypeError / ValueError naming ``name``."""
    if value is None:
        return 0, total
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"{name} must be a (start, stop) pair of ints over the {what}, or None; "
                        f"got {value!r}")
    start, stop = value
    for v in (start, stop):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be a (start, stop) pair of ints over the {what}, got {value!r}")
    start, stop = int(start), int(stop)
    if not 0 <= start <= stop <= total:
        raise ValueError(f"{name} must satisfy 0 <= start <= stop <= {total} (the number of {what}), "
                         f"got ({start}, {stop})")
    return start, stop


def _resolved(value: Optional[int], default: int) -> int:
    return default if value is None else int(value)


def _mean_heads(head_reduce: str) -> bool:
    if not isinstance(head_reduce, str) or head_reduce not in HEAD_REDUCTIONS:
        raise ValueError(f"head_reduce must be one of {HEAD_REDUCTIONS}, got {head_reduce!r}")
    return head_reduce == "mean"


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
