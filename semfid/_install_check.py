"""Is the ``semfid`` being imported the installed one? Says what is wrong when a folder shadows it.

Two ways a clone of the repository gets in the way:

- the current folder *is* a clone (it holds the ``semfid/`` source folder) that was never
  installed, or shadows the semfid installed elsewhere: the Triton kernels (``semfid.kernels``,
  mapped from ``kernels/`` only by the install) and the built C++ core are then missing or stale;
- the current folder *holds* a clone named ``semfid`` (the repository root, no ``__init__.py``):
  Python imports it as an empty namespace package, so ``semfid.__version__`` does not exist.
  semfid's own code never runs then; ``python -m semfid.info`` detects it (:func:`namespace_problem`).
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import List, Optional
from urllib.parse import unquote, urlparse

_FIX = "run from another folder, or install this copy with `pip install -e {root}`"


def _installed_package_dir(dist: metadata.Distribution) -> Optional[Path]:
    """Where the installed distribution's ``semfid`` package lives (editable or regular install)."""
    try:
        url = json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        url = {}
    if url.get("dir_info", {}).get("editable") and url.get("url", "").startswith("file:"):
        return Path(unquote(urlparse(url["url"]).path)) / "semfid"
    for f in dist.files or ():
        if str(f).replace("\\", "/") == "semfid/__init__.py":
            return Path(dist.locate_file(f)).parent
    return None


def _missing_parts(package_dir: Path) -> List[str]:
    """What an uninstalled source folder lacks: ``semfid/kernels`` (the install maps ``kernels/`` there;
    a checkout may hold a link) and the built C++ CPU core."""
    missing = []
    if not (package_dir / "kernels" / "__init__.py").exists():
        missing.append("the Triton kernels (semfid.kernels)")
    if not any(package_dir.glob("_cpu_ops*")):
        missing.append("the C++ CPU core")
    return missing


def install_problem(package_file: str) -> Optional[str]:
    """A sentence saying why the package at ``package_file`` (its ``__init__.py``) is not the installed
    semfid, or None when it is."""
    here = Path(package_file).resolve().parent
    try:
        dist = metadata.distribution("semfid")
    except metadata.PackageNotFoundError:
        missing = _missing_parts(here)
        what = f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not available" if missing else \
            "the kernels and compiled parts are found beside it, but nothing guarantees they match this source"
        return (f"semfid is imported from {here}, which is not installed (no package metadata): {what}; "
                + _FIX.format(root=here.parent))
    installed = _installed_package_dir(dist)
    if installed is not None and installed.resolve() != here:
        return (f"semfid is imported from {here}, which shadows the installed semfid at {installed} (the current "
                f"folder or PYTHONPATH holds a semfid/ folder); " + _FIX.format(root=here.parent))
    return None


def namespace_problem(module) -> Optional[str]:
    """A sentence when ``module`` (the imported ``semfid``) is an empty namespace package, else None."""
    if getattr(module, "__file__", None) is not None or hasattr(module, "__version__"):
        return None
    where = ", ".join(str(p) for p in getattr(module, "__path__", [])) or "an unknown folder"
    return (f"`import semfid` found the folder {where}, which has no __init__.py: a clone of the repository "
            "(its root) in the current folder shadows the installed package. Run from another folder, or "
            "`pip install -e .` inside the clone and run from outside it.")


__all__ = ["install_problem", "namespace_problem"]
