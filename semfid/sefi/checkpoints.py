"""Resumable training checkpoints: ``OUTPUT/checkpoints/step-{step:06d}/``.

Each checkpoint folder holds ``state.safetensors`` (``module.*``: the token module's state;
``optimizer.{param}.{key}``: the optimizer's tensors; ``rng``: the training generator's state) and
``state.json`` (the step, the optimizer's param groups and non-tensor state, and the options that
must not change across a resume). The JSON is written last: a folder without it is incomplete and
ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from . import schemas
from .errors import SefiInputError
from .files import PathLike, read_json, read_tensors, strip_prefix, write_json, write_tensors

CHECKPOINTS_DIR = "checkpoints"


class OptionsDiffer(SefiInputError):
    """A sound checkpoint trained with other options: :func:`pick_checkpoint` does not pass over it
    (every checkpoint of a run shares its options)."""


@dataclass
class Checkpoint:
    """A loaded training checkpoint."""

    step: int
    module_state: Dict[str, torch.Tensor]
    optimizer_state: dict
    generator_state: torch.Tensor
    config: dict


def _flatten_optimizer(state: dict) -> tuple:
    tensors, scalars = {}, {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            name = f"optimizer.{index}.{key}"
            if torch.is_tensor(value):
                tensors[name] = value
            else:
                scalars[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: Dict[str, torch.Tensor], meta: dict) -> dict:
    state: Dict[int, Dict[str, Any]] = {}
    entries = [(k, v) for k, v in tensors.items() if k.startswith("optimizer.")]
    entries += list(meta.get("scalars", {}).items())
    for name, value in entries:
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(directory: PathLike, step: int, module_state: Dict[str, torch.Tensor],
                    optimizer_state: dict, generator_state: torch.Tensor, config: dict) -> Path:
    r"""Write ``directory/checkpoints/step-{step:06d}/`` (safetensors + JSON) for resuming.

    Args:
        directory (`str` or `os.PathLike`): the training output folder.
        step (`int`): optimisation steps done.
        module_state (`Dict[str, Tensor]`): token module ``state_dict()``.
        optimizer_state (`dict`): ``optimizer.state_dict()`` (tensors go to safetensors, the rest JSON).
        generator_state (`Tensor`): the training RNG's ``get_state()`` (uint8).
        config (`dict`): training configuration (checked on resume).

    Returns:
        `Path`: the checkpoint folder.
    """
    folder = Path(directory) / CHECKPOINTS_DIR / f"step-{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
    tensors = {f"module.{k}": v for k, v in module_state.items()}
    tensors.update(opt_tensors)
    tensors["rng"] = generator_state
    write_tensors(folder / "state.safetensors", tensors)
    # the JSON goes last: a checkpoint without it is incomplete and ignored
    write_json(folder / "state.json", {"step": step, "optimizer": opt_meta, "config": config})
    return folder


def complete_checkpoints(directory: PathLike) -> List[Path]:
    """The complete checkpoint folders under ``directory/checkpoints``, fewest steps first."""
    root = Path(directory) / CHECKPOINTS_DIR
    return sorted(p for p in root.glob("step-*") if (p / "state.json").is_file()) if root.is_dir() else []


def latest_checkpoint(directory: PathLike) -> Optional[Path]:
    """The complete checkpoint with the most steps under ``directory/checkpoints``, or None."""
    found = complete_checkpoints(directory)
    return found[-1] if found else None


def prune_checkpoints(directory: PathLike, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints under ``directory/checkpoints``."""
    for old in complete_checkpoints(directory)[:-keep]:
        for f in old.iterdir():
            f.unlink()
        old.rmdir()


def load_checkpoint(folder: PathLike) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`, both files checked against their schema.

    Raises:
        SefiInputError: the folder is incomplete, or a file is unreadable or does not fit the schema.
    """
    folder = Path(folder)
    if not (folder / "state.json").is_file() or not (folder / "state.safetensors").is_file():
        raise SefiInputError(f"{folder} is not a complete semfid-train checkpoint")
    meta = schemas.checkpoint_meta(read_json(folder / "state.json"), str(folder / "state.json"))
    tensors = read_tensors(folder / "state.safetensors")
    schemas.checkpoint_tensors(tensors, str(folder / "state.safetensors"))
    return Checkpoint(meta["step"], strip_prefix(tensors, "module."),
                      _unflatten_optimizer(tensors, meta["optimizer"]), tensors["rng"], meta.get("config", {}))


def pick_checkpoint(output: PathLike, resume: Union[str, PathLike],
                    fits: Optional[Callable[[Checkpoint, str], None]] = None) -> Tuple[Path, Checkpoint, List[str]]:
    r"""The checkpoint ``--resume`` names: ``"latest"`` or a checkpoint folder.

    For ``"latest"`` the newest complete checkpoint under ``output`` that reads, fits its schema and
    passes ``fits`` is taken; newer ones that do not (a corrupt file) are skipped.

    Args:
        output (`str` or `os.PathLike`): the training output folder.
        resume (`str` or `os.PathLike`): ``"latest"`` or a checkpoint folder.
        fits (`Callable[[Checkpoint, str], None]`, *optional*): raises :class:`SefiInputError` when a
            checkpoint does not fit what it is loaded into (called with the folder), or
            :class:`OptionsDiffer`, which is raised at once.

    Returns:
        ``(folder, checkpoint, skipped)``: ``skipped`` holds one line per checkpoint passed over.

    Raises:
        SefiInputError: no usable checkpoint (each reason is named).
    """
    folders = [Path(resume)] if str(resume) != "latest" else list(reversed(complete_checkpoints(output)))
    skipped = []
    for folder in folders:
        try:
            checkpoint = load_checkpoint(folder)
            if fits is not None:
                fits(checkpoint, str(folder))
            return folder, checkpoint, skipped
        except SefiInputError as exc:
            if str(resume) != "latest" or isinstance(exc, OptionsDiffer):
                raise
            skipped.append(f"skipped the corrupt checkpoint {folder.name} ({exc})")
    if skipped:
        raise SefiInputError(f"--resume: no readable checkpoint in {output}: {'; '.join(skipped)}")
    raise SefiInputError(f"--resume: {output} holds no checkpoint")


__all__ = ["Checkpoint", "OptionsDiffer", "pick_checkpoint", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "complete_checkpoints",
           "prune_checkpoints", "CHECKPOINTS_DIR"]
