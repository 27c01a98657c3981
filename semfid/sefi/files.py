"""Safe reading and writing of the recipe's files: atomic writes, safetensors and JSON.

Tensors go to safetensors and everything else to JSON; nothing is ever pickled, so loading a file from
someone else cannot run code. Files are written to a temporary name in the same folder and renamed
into place, so an interrupted run never leaves a half-written file. A file that cannot be read raises
:class:`~semfid.sefi.errors.SefiInputError` naming it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import torch

from .errors import SefiInputError

PathLike = Union[str, os.PathLike]


def _file_mode() -> int:
    """The mode a plain ``open()`` gives a new file: ``0o666`` less the process umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` for a temporary path beside ``path``, then rename it to ``path``.

    Every file gets the same mode, that of a plain ``open()`` (some writers create theirs ``0o600``).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_json(path: PathLike, data: dict) -> Path:
    """Write ``data`` as indented JSON with sorted keys (atomically)."""
    def write(tmp: Path):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")

    return atomic_write(path, write)


def write_tensors(path: PathLike, tensors: Dict[str, torch.Tensor], metadata: Optional[dict] = None) -> Path:
    """Write ``tensors`` (moved to the CPU) as one safetensors file (atomically)."""
    from safetensors.torch import save_file

    # private copies: safetensors refuses entries that share storage (direct-mode pairs *are* the
    # module's parameter)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_tensors(path: PathLike) -> Dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; :class:`SefiInputError` if it cannot be read."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise SefiInputError(f"cannot read {path}: {exc}") from None


def read_json(path: PathLike) -> dict:
    """A JSON file as a dict; :class:`SefiInputError` if it cannot be read or parsed."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise SefiInputError(f"cannot read {path}: {str(exc)[:200]}") from None


def strip_prefix(tensors: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """The entries whose name starts with ``prefix``, with the prefix removed (``module.x`` -> ``x``)."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


__all__ = ["atomic_write", "strip_prefix", "write_json", "write_tensors", "read_tensors", "read_json", "PathLike"]
