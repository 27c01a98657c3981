"""The backend registry and the choice of a backend per call (see :mod:`semfid.backends`).

Below the backends (they register themselves here) and above :mod:`semfid.backends.base`.
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, List, Tuple, Type, Union

import torch as _pt  # not `torch`: that name is this package's torch backend module

from .._inputs import SubjectInputs, XattnInputs
from .base import BackendBase, _auto_refusal_cached

AnyInputs = Union[XattnInputs, SubjectInputs]

_REGISTRY: Dict[str, Type[BackendBase]] = {}
_WARNED: set = set()
_CHOICES: Dict[Tuple, Type[BackendBase]] = {}
_MAX_CHOICES = 4096

ENV_VAR = "SEMFID_BACKEND"


def register_backend(cls: Type[BackendBase]) -> Type[BackendBase]:
    """Class decorator: add a backend to the registry under ``cls.NAME``."""
    if not cls.NAME:
        raise ValueError(f"{cls.__name__} must set NAME")
    _REGISTRY[cls.NAME] = cls
    clear_selection_cache()
    return cls


def clear_selection_cache() -> None:
    """Forget memoised choices and validation verdicts (after registering a backend, changing its
    class attributes in a test, or running ``semfid.selftest`` in this process)."""
    _CHOICES.clear()
    _auto_refusal_cached.cache_clear()


def registered_backends() -> List[Type[BackendBase]]:
    """All registered backends, in ``auto`` order."""
    return sorted(_REGISTRY.values(), key=lambda b: b.PRIORITY)


def available_backends() -> List[str]:
    """Names of the backends that can run in this process (package/extension present)."""
    return [b.NAME for b in registered_backends() if b.unavailable_reason() is None]


def get_backend(name: str) -> Type[BackendBase]:
    """The backend class registered as ``name``; ``ValueError`` naming the choices otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"backend must be 'auto' or one of {sorted(_REGISTRY)}, got {name!r}"
        ) from None


def _format_reasons(inp: AnyInputs, table: Dict[str, List[str]]) -> str:
    lines = [f"inputs: {inp.summary()}"]
    for name, reasons in table.items():
        lines.append(f"  `{name}` cannot run them: " + "; ".join(reasons))
    return "\n".join(lines)


def selection_key(inp: AnyInputs, backend: str) -> Tuple:
    """What a choice may depend on: the request, SEMFID_BACKEND, the op, device, dtype, head and
    value dims, key and selected counts, head-mean or per-head maps, bias presence, whether
    gradients will be needed and whether the query / key ranges of a joint key set are used."""
    return (backend, os.environ.get(ENV_VAR, ""), type(inp), inp.device, inp.dtype, inp.head_dim,
            inp.value_dim, inp.num_keys, inp.num_selected, inp.mean_heads, inp.bias is None,
            inp.needs_grad and _pt.is_grad_enabled(), inp.joint_ranges)


def select_backend(inp: AnyInputs, backend: str = "auto") -> Type[BackendBase]:
    """Choose the backend that runs ``inp`` (see module docstring); memoised per selection_key."""
    if _pt.compiler.is_compiling():  # traced once per graph: no cache lookups in the graph
        return _select(inp, backend)
    key = selection_key(inp, backend)
    cls = _CHOICES.get(key)
    if cls is None:
        cls = _select(inp, backend)
        if len(_CHOICES) >= _MAX_CHOICES:
            _CHOICES.clear()
        _CHOICES[key] = cls
    return cls


def _select(inp: AnyInputs, backend: str) -> Type[BackendBase]:
    if backend != "auto":
        cls = get_backend(backend)
        reasons = cls.not_supported_reasons(inp)
        if reasons:
            raise ValueError(
                f"backend={backend!r} was requested but cannot run these inputs\n"
                + _format_reasons(inp, {cls.NAME: reasons})
            )
        return cls

    candidates = registered_backends()
    preferred = os.environ.get(ENV_VAR, "auto").strip() or "auto"
    if preferred != "auto":
        first = get_backend(preferred)
        reasons = first.not_supported_reasons(inp)
        if not reasons:
            return first
        key = (preferred, tuple(reasons))
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(
                f"{ENV_VAR}={preferred} cannot run some inputs ({'; '.join(reasons)}); "
                "falling back to automatic selection for them",
                stacklevel=3,
            )

    table: Dict[str, List[str]] = {}
    for cls in candidates:
        reasons = cls.not_supported_reasons(inp)
        if not reasons:  # only then ask for a verdict: that may run the self-test once
            refusal = cls.auto_refusal(inp.device)
            if refusal is None:
                return cls
            reasons = [refusal]
        table[cls.NAME] = reasons
    raise ValueError("no semfid backend can run these inputs\n" + _format_reasons(inp, table))
