"""Load the CUDA extension ``semfid._C`` once, without ever raising.

``import semfid`` must work without the extension (a CPU-only install, a torch it was not built
against): the failure is kept and reported as the ``cuda`` backend's unavailable reason and by
``python -m semfid.info``. Set ``SEMFID_MORE_DETAILS=1`` to see the full traceback.
"""

from __future__ import annotations

import importlib
import os
import traceback
from typing import Optional

_loaded = False
_error: Optional[BaseException] = None
_traceback: str = ""


def _load() -> None:
    global _loaded, _error, _traceback
    if _loaded or _error is not None:
        return
    try:
        importlib.import_module("semfid._C")  # registers torch.ops.semfid_C.*
        _loaded = True
    except Exception as exc:  # ImportError, OSError (undefined symbol), RuntimeError from torch
        _error = exc
        _traceback = traceback.format_exc()


def is_built() -> bool:
    """True when ``semfid._C`` loaded and registered its ops."""
    _load()
    return _loaded


def is_missing() -> bool:
    """True when no ``semfid._C`` exists at all (as opposed to one that fails to load)."""
    _load()
    return isinstance(_error, ModuleNotFoundError) and getattr(_error, "name", "") == "semfid._C"


def unavailable_reason() -> Optional[str]:
    """One line saying why the extension cannot be used, or None when it loaded."""
    _load()
    if _loaded:
        return None
    if is_missing():
        return ("the CUDA extension semfid._C is not built (install with a CUDA build of torch and nvcc: "
                "SEMFID_BUILD_CUDA=1 pip install --no-build-isolation .)")
    detail = f"{type(_error).__name__}: {_error}"
    if os.environ.get("SEMFID_MORE_DETAILS") == "1":
        detail += "\n" + _traceback
    else:
        detail += " (set SEMFID_MORE_DETAILS=1 for the traceback)"
    return f"the CUDA extension semfid._C failed to load: {detail}"


def status() -> str:
    """For ``python -m semfid.info``: "loaded" or the reason it is not."""
    reason = unavailable_reason()
    return "loaded" if reason is None else reason
