"""Loading the frozen parts of a local SD1.5 / SDXL diffusers pipeline folder.

Nothing is downloaded: every ``from_pretrained`` call uses ``local_files_only``. The folder's kind
(``"sd15"`` or ``"sdxl"``) comes from its ``model_index.json`` (SDXL has a second text encoder).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from . import schemas
from .errors import SefiInputError
from .files import PathLike, read_json
from .text import token_widths


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
    index = read_json(index_path)
    text_encoder_2 = index.get("text_encoder_2") if isinstance(index, dict) else None
    required = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    if isinstance(text_encoder_2, list) and text_encoder_2 and text_encoder_2[0] is not None:
        kind = "sdxl"
        required += ["text_encoder_2", "tokenizer_2"]
    else:
        kind = "sd15"
    schemas.model_index(index, str(index_path), required)
    absent = [name for name in required if not (model / name).is_dir()]
    if absent:
        raise SefiInputError(f"{model} lacks the component folder(s) {', '.join(absent)}")
    return kind


def load_tokenizers(model: PathLike) -> list:
    """The CLIP tokenizer(s) of a checked diffusers folder (one for SD1.5, two for SDXL), quickly:
    placeholders are checked against them before any model is loaded."""
    from transformers import CLIPTokenizer

    folders = ["tokenizer", "tokenizer_2"] if detect_kind(model) == "sdxl" else ["tokenizer"]
    try:
        return [CLIPTokenizer.from_pretrained(model, subfolder=f, local_files_only=True) for f in folders]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SefiInputError(f"cannot load the tokenizer in {model}: {first}") from None


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
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    kind = detect_kind(model)
    model = Path(model)
    index = read_json(model / "model_index.json")
    tokenizers = load_tokenizers(model)
    common = dict(local_files_only=True, variant=variant)
    try:
        vae_config = AutoencoderKL.load_config(model, subfolder="vae", local_files_only=True)
        vae_dtype = torch.float32 if vae_config.get("force_upcast", False) else dtype
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype, **common)
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=vae_dtype, **common)
        common["torch_dtype"] = dtype
        text_encoders = [CLIPTextModel.from_pretrained(model, subfolder="text_encoder", **common)]
        if kind == "sdxl":
            text_encoders.append(
                CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2", **common)
            )
        scheduler_class = getattr(diffusers, index["scheduler"][1])  # in schemas.SCHEDULERS
        scheduler = scheduler_class.from_pretrained(model, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
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
        "token_widths": token_widths(components.text_encoders),
        "cross_attention_dim": int(components.unet.config.cross_attention_dim),
        "num_train_timesteps": int(components.scheduler.config.num_train_timesteps),
    }


__all__ = ["Components", "detect_kind", "load_tokenizers", "load_components", "model_dims"]
