"""Backend registry and dispatch.

Each backend is a :class:`~semfid.backends.base.BackendBase` subclass registered with
:func:`register_backend`. :func:`select_backend` picks one per call:

* ``backend="auto"`` (default): the first registered backend, by ``PRIORITY``, whose
  ``not_supported_reasons`` is empty and that is validated on the input's device
  (:meth:`~semfid.backends.base.BackendBase.auto_refusal`: ``AUTO_DEVICES``, or a passing
  :mod:`semfid.selftest` verdict). The ``SEMFID_BACKEND`` environment variable names a backend to
  try first (it is skipped, with a one-time warning, for inputs it cannot take).
* ``backend="<name>"``: that backend, or a ``ValueError`` listing why it cannot run the input.

Choices are memoised per :func:`selection_key` (device, dtype, shape class, grad mode), so a
training step's hundreds of calls scan the registry once per layer shape.
"""

from .base import BackendBase
from .registry import (  # noqa: F401  (_REGISTRY: tests register fakes)
    ENV_VAR,
    _REGISTRY,
    available_backends,
    clear_selection_cache,
    get_backend,
    register_backend,
    registered_backends,
    select_backend,
    selection_key,
)

# Built-in backends register themselves on import; none of these imports a kernel package eagerly.
from . import torch as _torch_backend  # noqa: E402,F401
from . import triton as _triton_backend  # noqa: E402,F401
from . import cuda as _cuda_backend  # noqa: E402,F401
from . import sdpa_backend as _sdpa_backend  # noqa: E402,F401

__all__ = [
    "BackendBase",
    "register_backend",
    "registered_backends",
    "available_backends",
    "get_backend",
    "select_backend",
    "selection_key",
    "clear_selection_cache",
]
