"""Decide whether and how ``setup.py`` builds the CUDA extension ``semfid._C``.

Kept beside the CUDA sources so ``setup.py`` stays a list of switches. See setup.py for the
environment variables.
"""

from __future__ import annotations

import os
from typing import Dict, List, Tuple


def _mode() -> str:
    mode = os.environ.get("SEMFID_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"SEMFID_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


def cuda_build(root: str) -> Tuple[List[object], Dict[str, object]]:
    """Return ``(ext_modules, cmdclass)`` for setup(); empty when the CUDA build is skipped."""
    mode = _mode()
    if mode == "0":
        print("semfid: CUDA kernels skipped (SEMFID_BUILD_CUDA=0)")
        return [], {}
    reason = "no CUDA sources in csrc/ yet"
    if mode == "1":
        raise SystemExit(f"semfid: SEMFID_BUILD_CUDA=1 but the CUDA build cannot run: {reason}")
    print(f"semfid: CUDA kernels skipped ({reason})")
    return [], {}
