"""Where self-test verdicts live and what they are keyed by.

A verdict is valid for exactly one combination of GPU (name, compute capability), torch, triton
and semfid versions, and the kernel sources (a SHA-256 of the files that run). It is a JSON file:

* cached per user in ``$SEMFID_CACHE_DIR/selftest/`` (default ``~/.cache/semfid/selftest/``);
* or shipped in the package, ``semfid/verdicts/*.json`` (written by ``python -m semfid.selftest
  --ship PATH`` from ``benchmarks/gpu_check.sh`` on a GPU where it passed, and committed).

Concurrent first use (DDP / ``accelerate launch`` ranks) is serialised by an ``fcntl`` lock on a
file next to the verdict: one process runs the self-test, the others wait and read its verdict.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import platform
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch

CACHE_ENV = "SEMFID_CACHE_DIR"
#: Verdict files shipped with the package (tests point this elsewhere).
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "verdicts"


class CacheUnusable(OSError):
    """The cache directory cannot be created, written or locked."""


# ---- the key --------------------------------------------------------------------------------
def device_identity(device: torch.device) -> Dict[str, str]:
    """GPU name and compute capability (``"cpu"`` for a CPU device, used by the tests)."""
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        major, minor = torch.cuda.get_device_capability(index)
        return {"device": torch.cuda.get_device_name(index), "capability": f"sm_{major}{minor}"}
    return {"device": platform.processor() or platform.machine() or device.type,
            "capability": device.type}


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def kernel_sources(backend_cls: type) -> List[Path]:
    """The files whose content decides what the backend's kernels compute.

    ``triton``: every ``*.py`` of ``semfid.kernels``; ``cuda``: the built ``semfid._C`` library;
    any other backend (the sdpa backend, the tests' fakes): the module that defines its class.
    Located without importing triton or loading the extension.
    """
    name = getattr(backend_cls, "NAME", "")
    if name == "triton":
        spec = importlib.util.find_spec("semfid.kernels")
        if spec is not None and spec.submodule_search_locations:
            return sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.py"))
        return []
    if name == "cuda":
        spec = importlib.util.find_spec("semfid._C")
        return [Path(spec.origin)] if spec is not None and spec.origin else []
    source = inspect.getsourcefile(backend_cls)
    return [Path(source)] if source else []


def source_hash(backend_cls: type) -> str:
    """SHA-256 over the names and bytes of :func:`kernel_sources` ("missing" when none exist)."""
    files = kernel_sources(backend_cls)
    if not files:
        return "missing"
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def verdict_key(backend_cls: type, device: torch.device) -> Dict[str, str]:
    """Everything a verdict depends on; a verdict counts only where its key is equal."""
    import semfid

    key = {"backend": backend_cls.NAME}
    key.update(device_identity(device))
    key.update(torch=torch.__version__, triton=_package_version("triton"),
               semfid=semfid.__version__, sources=source_hash(backend_cls))
    return key


def key_digest(key: Dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


# ---- files ----------------------------------------------------------------------------------
def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "semfid")
    return Path(root) / "selftest"


def verdict_path(key: Dict[str, str]) -> Path:
    return cache_dir() / f"{key['backend']}-{key_digest(key)}.json"


def read_json(path: Path) -> Optional[dict]:
    """The JSON object in ``path``, or None when it is absent or unreadable (never raises)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_cached(key: Dict[str, str]) -> Optional[dict]:
    data = read_json(verdict_path(key))
    return data if data is not None and data.get("key") == key else None


def load_shipped(key: Dict[str, str]) -> Optional[dict]:
    """A shipped verdict file with exactly this key, or None."""
    if not SHIPPED_DIR.is_dir():
        return None
    for path in sorted(SHIPPED_DIR.glob("*.json")):
        data = read_json(path)
        if data is not None and data.get("key") == key:
            return data
    return None


def write_json(path: Path, record: dict) -> None:
    """Write atomically (temp file + rename), so a reader never sees half a verdict."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def save_cached(record: dict) -> Path:
    path = verdict_path(record["key"])
    try:
        write_json(path, record)
    except OSError as exc:
        raise CacheUnusable(f"cannot write {path}: {exc}") from exc
    return path


@contextlib.contextmanager
def locked(key: Dict[str, str]) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock for this key (waits while another process holds it)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock, ranks may each run the test
        yield
        return
    path = verdict_path(key).with_suffix(".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
    except OSError as exc:
        raise CacheUnusable(f"cannot create {path}: {exc}") from exc
    with handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
