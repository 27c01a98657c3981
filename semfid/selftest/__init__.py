"""Self-validation of semfid's kernel backends on the user's own GPU.

A kernel that passed the interpreter and the compile checks can still be wrong on a GPU nobody
tested (precision, races, layouts). ``backend="auto"`` therefore uses the Triton / CUDA backends
(``SELF_VALIDATED``) on a CUDA device only with a passing verdict for that exact device, software
and kernel sources (:mod:`.cache`): shipped with the package, cached from an earlier run, or
from a run of the battery (:mod:`.battery`, in child processes: :mod:`.runner`) on first use.

``SEMFID_SELFTEST`` environment variable:
  (unset) / ``on``  run the self-test once by itself when no verdict exists (one log line)
  ``off``           never run it; only shipped verdicts and explicit ``python -m semfid.selftest``
                    runs count (without one, ``auto`` takes the sdpa or torch backend)
  ``force``         rerun it, once per process, even when a verdict exists

Explicitly: ``python -m semfid.selftest [--backend triton|cuda|sdpa|all] [--quick] [--ship PATH]``.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import cache

MODE_ENV = "SEMFID_SELFTEST"
_log = logging.getLogger("semfid")
_WARNED: set = set()


@dataclass(frozen=True)
class Verdict:
    """Whether a backend may be used by ``auto`` on one device, and why.

    ``source``: ``"cache"`` (this user's cache), ``"shipped"`` (in the package), ``"ran"`` (the
    self-test just ran) or ``"none"`` (no verdict: self-test off, cache unusable, no device).
    """

    passed: bool
    reason: str
    source: str
    record: Optional[dict] = field(default=None, compare=False, repr=False)


def rerun_command(backend_name: str) -> str:
    return f"python -m semfid.selftest --backend {backend_name}"


def _warn_once(key: tuple, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _from_record(record: dict, source: str) -> Verdict:
    key = record["key"]
    if record.get("passed"):
        return Verdict(True, f"passed its self-test on {key['device']} ({key['capability']})",
                       source, record)
    failures = record.get("failures") or ["unknown failure"]
    shown = "; ".join(failures[:3]) + (f"; and {len(failures) - 3} more" if len(failures) > 3 else "")
    _warn_once(("failed", cache.key_digest(key)),
               f"semfid: the {key['backend']} kernels failed their self-test on {key['device']} "
               f"({key['capability']}), so backend='auto' skips them: {shown}. "
               f"Rerun: {rerun_command(key['backend'])}")
    return Verdict(False, f"self-test failed: {shown}", source, record)


def _mode() -> str:
    mode = os.environ.get(MODE_ENV, "on").strip().lower() or "on"
    return mode if mode in ("on", "off", "force") else "on"


def verdict_for(backend_name: str, device: torch.device) -> Verdict:
    """The self-test verdict for ``backend_name`` on ``device`` (see the module docstring).

    Never raises: an unknown device, a missing or read-only cache directory or an unavailable
    backend give a not-passed verdict (the cache problem with one warning). A failed verdict
    warns once, naming the failing cases and the command to rerun.
    """
    from ..backends import get_backend
    from .runner import run_selftest

    cls = get_backend(backend_name)
    missing = cls.unavailable_reason()
    if missing is not None:
        return Verdict(False, f"not available: {missing}", "none")
    try:
        key = cache.verdict_key(cls, torch.device(device))
    except Exception as exc:  # e.g. a CUDA device that cannot be queried
        return Verdict(False, f"no verdict ({device} cannot be identified: {exc})", "none")
    mode = _mode()
    if mode != "force":
        record = cache.load_cached(key)
        if record is not None:
            return _from_record(record, "cache")
        record = cache.load_shipped(key)
        if record is not None:
            return _from_record(record, "shipped")
    if mode == "off":
        return Verdict(False, f"no verdict (self-test off: {MODE_ENV}=off)", "none")

    requested = time.time()
    try:
        with cache.locked(key):
            # Another rank may have run it while this one waited for the lock.
            record = cache.load_cached(key)
            if record is not None and (mode != "force" or record.get("created", 0) >= requested):
                return _from_record(record, "cache")
            record = run_selftest(cls, torch.device(device))
            path = cache.save_cached(record)
    except cache.CacheUnusable as exc:
        _warn_once(("cache", str(cache.cache_dir())),
                   f"semfid: the self-test cache is unusable ({exc}); set {cache.CACHE_ENV} to a "
                   f"writable directory. Until then {backend_name} counts as not validated.")
        return Verdict(False, f"not validated (self-test cache unusable: {exc})", "none")
    outcome = "validated" if record["passed"] else "REJECTED"
    _log.warning("semfid: %s %s kernels on %s (%s) in %.0f s; cached in %s", outcome, backend_name,
                 key["device"], key["capability"], record["seconds"], path)
    return _from_record(record, "ran")


__all__ = ["Verdict", "verdict_for", "rerun_command"]
