"""Load the C++ CPU core ``semfid._cpu_ops`` (``csrc/cpu/subject_core.cpp``) once, never raising.

It is the torch backend's subject op written against ATen in C++: the same algorithm as the Python
implementation in :mod:`semfid.backends.torch`, which stays the fallback when the core is not built
(``SEMFID_BUILD_CPU=0``, no compiler) and the reference the tests compare it with. Set
``SEMFID_CPU_CORE=0`` to run the Python implementation although the core is built.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Optional

_module: Optional[ModuleType] = None
_reason: Optional[str] = None
_tried = False


def module() -> Optional[ModuleType]:
    """The loaded extension, or None (see :func:`status` for why)."""
    global _module, _reason, _tried
    if not _tried:
        _tried = True
        if os.environ.get("SEMFID_CPU_CORE", "1").strip() == "0":
            _reason = "disabled by SEMFID_CPU_CORE=0"
        else:
            try:
                _module = importlib.import_module("semfid._cpu_ops")
            except Exception as exc:  # ImportError, OSError (undefined symbol): keep Python
                _reason = (f"not loadable ({type(exc).__name__}: {exc}); reinstall with "
                           "SEMFID_BUILD_CPU=1 pip install --no-build-isolation -e .")
    return _module


def status() -> str:
    """For ``python -m semfid.info``: "loaded" or why the Python implementation runs instead."""
    return "loaded" if module() is not None else str(_reason)
