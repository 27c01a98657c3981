"""Everything SeFi-IDE reads or writes on disk: learned tokens, checkpoints, images, pipeline folders.

Learned tokens and checkpoints are safetensors (tensors) + JSON (everything else); nothing is ever
pickled, so loading a file from someone else cannot run code. Files are written to a temporary name in
the same folder and renamed into place, so an interrupted run never leaves a half-written file.

Bad user input (missing files, undecodable images, incompatible embeddings...) raises
:class:`SefiInputError`, which the CLIs print as one line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

PathLike = Union[str, os.PathLike]

#: File names inside a learned-token folder.
TOKENS_FILE = "sefi_tokens.safetensors"
CONFIG_FILE = "sefi_config.json"
#: Layout version of the learned-token folder.
FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"


class SefiInputError(ValueError):
    """Bad input from the user (a file, an option, a prompt); the message is one readable line."""


# ------------------------------------------------------------------------------------------------
# atomic writes
# ------------------------------------------------------------------------------------------------
def atomic_write(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` for a temporary path beside ``path``, then rename it to ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _write_json(path: PathLike, data: dict) -> Path:
    def write(tmp: Path):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")

    return atomic_write(path, write)


def _write_tensors(path: PathLike, tensors: Dict[str, torch.Tensor], metadata: Optional[dict] = None) -> Path:
    from safetensors.torch import save_file

    # private copies: safetensors refuses entries that share storage (direct-mode pairs *are* the
    # module's parameter)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _read_tensors(path: PathLike) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise SefiInputError(f"cannot read {path}: {exc}") from None


def _read_json(path: PathLike) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise SefiInputError(f"cannot read {path}: {exc}") from None


# ------------------------------------------------------------------------------------------------
# learned tokens
# ------------------------------------------------------------------------------------------------
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
    _write_tensors(directory / TOKENS_FILE, tensors, metadata={"format": "semfid-sefi"})
    _write_json(directory / CONFIG_FILE, dict(config, format_version=FORMAT_VERSION))
    return directory


_REQUIRED = ("placeholder", "class_word", "num_stages", "num_vectors", "kind", "token_widths",
             "cross_attention_dim", "num_train_timesteps")


def load_learned(directory: PathLike) -> LearnedSubject:
    r"""Read a folder written by :func:`save_learned` (or ``semfid-train``).

    Raises:
        SefiInputError: the folder or its files are missing, unreadable or inconsistent.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise SefiInputError(f"embeddings folder {directory} does not exist")
    for name in (TOKENS_FILE, CONFIG_FILE):
        if not (directory / name).is_file():
            raise SefiInputError(f"{directory} holds no {name}: not a semfid-train output folder")
    config = _read_json(directory / CONFIG_FILE)
    missing = [k for k in _REQUIRED if k not in config]
    if missing:
        raise SefiInputError(f"{directory / CONFIG_FILE} lacks {', '.join(missing)}")
    tensors = _read_tensors(directory / TOKENS_FILE)
    widths = [int(w) for w in config["token_widths"]]
    pairs = []
    for e, width in enumerate(widths):
        p = tensors.get(f"pairs.{e}")
        want = (int(config["num_stages"]), 2, int(config["num_vectors"]), width)
        if p is None or tuple(p.shape) != want:
            got = None if p is None else tuple(p.shape)
            raise SefiInputError(f"{directory / TOKENS_FILE}: pairs.{e} should be {want}, got {got}")
        pairs.append(p)
    module_state = {k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")}
    return LearnedSubject(
        placeholder=str(config["placeholder"]), class_word=str(config["class_word"]),
        num_stages=int(config["num_stages"]), num_vectors=int(config["num_vectors"]),
        kind=str(config["kind"]), token_widths=widths,
        cross_attention_dim=int(config["cross_attention_dim"]),
        num_train_timesteps=int(config["num_train_timesteps"]), pairs=pairs,
        module_state=module_state, config=config, source=str(directory),
    )


# ------------------------------------------------------------------------------------------------
# training checkpoints
# ------------------------------------------------------------------------------------------------
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
    _write_tensors(folder / "state.safetensors", tensors)
    # the JSON goes last: a checkpoint without it is incomplete and ignored
    _write_json(folder / "state.json", {"step": step, "optimizer": opt_meta, "config": config})
    return folder


def latest_checkpoint(directory: PathLike) -> Optional[Path]:
    """The complete checkpoint with the most steps under ``directory/checkpoints``, or None."""
    root = Path(directory) / CHECKPOINTS_DIR
    found = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file()) if root.is_dir() else []
    return found[-1] if found else None


@dataclass
class Checkpoint:
    """A loaded training checkpoint."""

    step: int
    module_state: Dict[str, torch.Tensor]
    optimizer_state: dict
    generator_state: torch.Tensor
    config: dict


def load_checkpoint(folder: PathLike) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    folder = Path(folder)
    if not (folder / "state.json").is_file() or not (folder / "state.safetensors").is_file():
        raise SefiInputError(f"{folder} is not a complete semfid-train checkpoint")
    meta = _read_json(folder / "state.json")
    tensors = _read_tensors(folder / "state.safetensors")
    module_state = {k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")}
    return Checkpoint(int(meta["step"]), module_state, _unflatten_optimizer(tensors, meta["optimizer"]),
                      tensors["rng"], meta.get("config", {}))


# ------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------
def load_images(paths: Sequence[PathLike]) -> list:
    r"""Open and decode every image (RGB PIL images), failing on the first bad one.

    Raises:
        SefiInputError: a path is missing or is not a decodable image.
    """
    from PIL import Image, UnidentifiedImageError

    if not paths:
        raise SefiInputError("give at least one --image")
    images = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise SefiInputError(f"image {path} does not exist")
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise SefiInputError(f"cannot decode image {path}: {exc}") from None
    return images


def save_image(image, path: PathLike) -> Path:
    """Save a PIL image atomically; the format follows the file suffix."""
    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
    return atomic_write(path, lambda tmp: image.save(tmp, format=fmt))


# ------------------------------------------------------------------------------------------------
# diffusers pipeline folders
# ------------------------------------------------------------------------------------------------
@dataclass
class Components:
    r"""The frozen parts of a local SD1.5 / SDXL diffusers folder.

    Attributes:
        kind (`str`): ``"sd15"`` or ``"sdxl"``.
        unet, vae: the diffusers models.
        tokenizers (`list`), text_encoders (`list`): one (SD1.5) or two (SDXL) of each.
        scheduler: the folder's sampling scheduler.
        force_zeros_for_empty_prompt (`bool`): SDXL's rule for the unconditional states.
        path (`str`): the folder.
    """

    kind: str
    unet: Any
    vae: Any
    tokenizers: list
    text_encoders: list
    scheduler: Any
    force_zeros_for_empty_prompt: bool = False
    path: str = ""


def detect_kind(model: PathLike) -> str:
    """``"sdxl"`` or ``"sd15"`` from a diffusers folder's ``model_index.json``."""
    model = Path(model)
    if not model.is_dir():
        raise SefiInputError(f"model folder {model} does not exist")
    index_path = model / "model_index.json"
    if not index_path.is_file():
        raise SefiInputError(f"{model} holds no model_index.json: expected a diffusers SD1.5 or SDXL folder")
    index = _read_json(index_path)
    required = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    if index.get("text_encoder_2") and index["text_encoder_2"][0] is not None:
        kind = "sdxl"
        required += ["text_encoder_2", "tokenizer_2"]
    else:
        kind = "sd15"
    absent = [name for name in required if not (model / name).is_dir()]
    if absent:
        raise SefiInputError(f"{model} lacks the component folder(s) {', '.join(absent)}")
    return kind


def load_components(model: PathLike, *, device: Union[str, torch.device] = "cpu",
                    dtype: torch.dtype = torch.float32, variant: Optional[str] = None) -> Components:
    r"""Load the UNet, VAE, tokenizer(s), text encoder(s) and scheduler of a local diffusers folder.

    Nothing is downloaded (``local_files_only``). All models are frozen (``requires_grad_(False)``,
    ``eval()``) and moved to ``device`` in ``dtype``, except a VAE whose config asks for
    ``force_upcast`` (SDXL's), which stays in float32.

    Args:
        model (`str` or `os.PathLike`): the pipeline folder.
        device (`str` or `torch.device`, *optional*, defaults to ``"cpu"``).
        dtype (`torch.dtype`, *optional*, defaults to float32): weight dtype of the frozen models.
        variant (`str`, *optional*): weight variant to load (``"fp16"``).

    Raises:
        SefiInputError: not a diffusers SD1.5 / SDXL folder.
    """
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kind = detect_kind(model)
    model = Path(model)
    index = _read_json(model / "model_index.json")
    common = dict(local_files_only=True, variant=variant)
    try:
        vae_config = AutoencoderKL.load_config(model, subfolder="vae", local_files_only=True)
        vae_dtype = torch.float32 if vae_config.get("force_upcast", False) else dtype
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype, **common)
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=vae_dtype, **common)
        tokenizers = [CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", local_files_only=True)]
        common["torch_dtype"] = dtype
        text_encoders = [CLIPTextModel.from_pretrained(model, subfolder="text_encoder", **common)]
        if kind == "sdxl":
            tokenizers.append(CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2", local_files_only=True))
            text_encoders.append(
                CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2", **common)
            )
        scheduler_class = getattr(diffusers, index["scheduler"][1])
        scheduler = scheduler_class.from_pretrained(model, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SefiInputError(f"cannot load the pipeline in {model}: {first}") from None
    for m in [unet, vae] + text_encoders:
        m.requires_grad_(False)
        m.eval()
    for m in [unet, vae] + text_encoders:
        m.to(device)
    force_zeros = bool(index.get("force_zeros_for_empty_prompt", kind == "sdxl"))
    return Components(kind, unet, vae, tokenizers, text_encoders, scheduler, force_zeros, str(model))


def model_dims(components: Components) -> dict:
    """The numbers learned tokens must match: kind, token widths, cross-attention width, T."""
    return {
        "kind": components.kind,
        "token_widths": [int(te.get_input_embeddings().weight.shape[1]) for te in components.text_encoders],
        "cross_attention_dim": int(components.unet.config.cross_attention_dim),
        "num_train_timesteps": int(components.scheduler.config.num_train_timesteps),
    }


__all__ = [
    "SefiInputError", "LearnedSubject", "save_learned", "load_learned", "save_checkpoint", "load_checkpoint",
    "latest_checkpoint", "Checkpoint", "load_images", "save_image", "Components", "detect_kind",
    "load_components", "model_dims", "atomic_write", "TOKENS_FILE", "CONFIG_FILE",
]
