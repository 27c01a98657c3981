"""The learned-token folder: what ``semfid-train`` writes and ``semfid-generate`` reads.

A folder holds two files:

* ``sefi_tokens.safetensors`` — ``pairs.{e}`` [S, 2, n, d_e] float32 per text encoder ``e`` (P^K at
  index 0 of dim 1, P^V at 1) and ``module.*``, the token module's ``state_dict()``;
  safetensors metadata ``{"format": "semfid-sefi"}``.
* ``sefi_config.json`` — placeholder, class word, S, n, model kind and widths, the stage rule's T,
  the training arguments and ``format_version`` (:data:`FORMAT_VERSION`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from . import schemas
from .errors import SefiInputError
from .files import PathLike, read_json, read_tensors, strip_prefix, write_json, write_tensors

#: File names inside a learned-token folder.
TOKENS_FILE = "sefi_tokens.safetensors"
CONFIG_FILE = "sefi_config.json"
#: Layout version of the learned-token folder.
FORMAT_VERSION = 1



@dataclass
class LearnedSubject:
    r"""A trained placeholder as stored in an output folder.

    Attributes:
        placeholder (`str`): the placeholder string, e.g. ``"<v*>"``.
        class_word (`str`): the class word of the reference prompt (``"person"``, ``"cat"``...).
        num_stages (`int`): S.
        num_vectors (`int`): n.
        kind (`str`): ``"sd15"`` or ``"sdxl"``.
        token_widths (`List[int]`): token-embedding width of each text encoder.
        cross_attention_dim (`int`): the UNet's text-state width.
        num_train_timesteps (`int`): T of the stage rule ``floor(t · S / T)``.
        pairs (`List[Tensor]`): per text encoder, [S, 2, n, d_e] float32 (P^K at index 0, P^V at 1).
        module_state (`Dict[str, Tensor]`): the token module's state (generator weights).
        config (`dict`): the full JSON (mode, template, initializer, training arguments...).
        source (`str`): the folder it was read from.
    """

    placeholder: str
    class_word: str
    num_stages: int
    num_vectors: int
    kind: str
    token_widths: List[int]
    cross_attention_dim: int
    num_train_timesteps: int
    pairs: List[torch.Tensor]
    module_state: Dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    source: str = ""


def save_learned(directory: PathLike, pairs: Sequence[torch.Tensor], module_state: Dict[str, torch.Tensor],
                 config: dict) -> Path:
    r"""Write a learned-token folder: ``sefi_tokens.safetensors`` + ``sefi_config.json``.

    Args:
        directory (`str` or `os.PathLike`): the folder (created if needed).
        pairs (`Sequence[Tensor]`): per text encoder [S, 2, n, d_e].
        module_state (`Dict[str, Tensor]`): the token module's ``state_dict()``.
        config (`dict`): JSON-serialisable description (placeholder, class_word, num_stages,
            num_vectors, kind, token_widths, cross_attention_dim, num_train_timesteps, ...).

    Returns:
        `Path`: ``directory``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"pairs.{e}": p.float() for e, p in enumerate(pairs)}
    tensors.update({f"module.{k}": v for k, v in module_state.items()})
    write_tensors(directory / TOKENS_FILE, tensors, metadata={"format": "semfid-sefi"})
    write_json(directory / CONFIG_FILE, dict(config, format_version=FORMAT_VERSION))
    return directory


def load_learned(directory: PathLike) -> LearnedSubject:
    r"""Read a folder written by :func:`save_learned` (or ``semfid-train``).

    Both files are checked against their schema (:mod:`semfid.sefi.schemas`) before use.

    Raises:
        SefiInputError: the folder or its files are missing, unreadable or inconsistent.
    """
    directory = Path(directory)
    if directory.is_file():
        raise SefiInputError(f"--embeddings {directory} is a file; give the folder semfid-train wrote "
                             f"(with {TOKENS_FILE} and {CONFIG_FILE})")
    if not directory.is_dir():
        raise SefiInputError(f"embeddings folder {directory} does not exist")
    for name in (TOKENS_FILE, CONFIG_FILE):
        if not (directory / name).is_file():
            raise SefiInputError(f"{directory} holds no {name}: not a semfid-train output folder")
    config = schemas.learned_config(read_json(directory / CONFIG_FILE), str(directory / CONFIG_FILE),
                                    FORMAT_VERSION)
    tensors = read_tensors(directory / TOKENS_FILE)
    pairs = schemas.learned_tensors(tensors, config, str(directory / TOKENS_FILE))
    return LearnedSubject(
        placeholder=config["placeholder"], class_word=config["class_word"],
        num_stages=config["num_stages"], num_vectors=config["num_vectors"],
        kind=config["kind"], token_widths=config["token_widths"],
        cross_attention_dim=config["cross_attention_dim"],
        num_train_timesteps=config["num_train_timesteps"], pairs=pairs,
        module_state=strip_prefix(tensors, "module."), config=config, source=str(directory),
    )


__all__ = ["LearnedSubject", "save_learned", "load_learned", "TOKENS_FILE", "CONFIG_FILE", "FORMAT_VERSION"]
