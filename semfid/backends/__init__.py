"""Backend registry and dispatch.

Each backend is a :class:`~semfid.backends.base.BackendBase` subclass registered with
:func:`register_backend`. :func:`select_backend` picks one per call:

* ``backend="auto"`` (default): the first registered backend, by ``PRIORITY``, whose ``AUTO_DEVICES``
  contain the input's device and whose ``not_supported_reasons`` is empty. The ``SEMFID_BACKEND``
  environment variable names a backend to try first (it is skipped, with a one-time warning, for
  inputs it cannot take).
* ``backend="<name>"``: that backend, or a ``ValueError`` listing why it cannot run the input.
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, List, Type

from .._inputs import XattnInputs
from .base import BackendBase

_REGISTRY: Dict[str, Type[BackendBase]] = {}
_WARNED: set = set()

ENV_VAR = "SEMFID_BACKEND"


def register_backend(cls: Type[BackendBase]) -> Type[BackendBase]:
    """Class decorator: add a backend to the registry under ``cls.NAME``."""
    if not cls.NAME:
        raise ValueError(f"{cls.__name__} must set NAME")
    _REGISTRY[cls.NAME] = cls
    return cls


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


def _format_reasons(inp: XattnInputs, table: Dict[str, List[str]]) -> str:
    lines = [f"inputs: {inp.summary()}"]
    for name, reasons in table.items():
        lines.append(f"  `{name}` cannot run them: " + "; ".join(reasons))
    return "\n".join(lines)


def select_backend(inp: XattnInputs, backend: str = "auto") -> Type[BackendBase]:
    """Choose the backend that runs ``inp`` (see module docstring)."""
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

    for cls in candidates:
        # Cheap test first: most backends are not validated for auto on most devices.
        if inp.device.type in cls.AUTO_DEVICES and not cls.not_supported_reasons(inp):
            return cls
    table: Dict[str, List[str]] = {}
    for cls in candidates:
        reasons = cls.not_supported_reasons(inp)
        if inp.device.type not in cls.AUTO_DEVICES:
            reasons = reasons + [f"not validated on {inp.device.type} (use backend={cls.NAME!r})"]
        table[cls.NAME] = reasons
    raise ValueError("no semfid backend can run these inputs\n" + _format_reasons(inp, table))


# Built-in backends register themselves on import; none of these imports a kernel package eagerly.
from . import torch as _torch_backend  # noqa: E402,F401
from . import triton as _triton_backend  # noqa: E402,F401
from . import cuda as _cuda_backend  # noqa: E402,F401

__all__ = [
    "BackendBase",
    "register_backend",
    "registered_backends",
    "available_backends",
    "get_backend",
    "select_backend",
]
