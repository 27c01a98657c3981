"""The UNet configs of SD1.5 and SDXL base, and their structural twins, with nothing downloaded.

``testing/configs/`` beside this file holds four ``UNet2DConditionModel`` configs:

* ``sd15_unet``, ``sdxl_unet`` — the full-size models (16 / 70 cross-attention layers, 859,520,964 /
  2,567,463,684 parameters), for benchmarks at real shapes with random weights;
* ``sd15_unet_twin``, ``sdxl_unet_twin`` — the same block layout and the same attention layer names
  with tiny widths, for fast CPU tests and the tiny pipelines of :mod:`semfid.sefi.tiny`.
"""

from __future__ import annotations

import json
from importlib import resources

UNET_CONFIGS = ("sd15_unet", "sdxl_unet", "sd15_unet_twin", "sdxl_unet_twin")


def load_unet_config(name: str) -> dict:
    r"""One of the shipped UNet configs as a (fresh) dict.

    Args:
        name (`str`): ``"sd15_unet"``, ``"sdxl_unet"`` (full size: 16 / 70 attn2 layers) or their
            structural twins ``"sd15_unet_twin"``, ``"sdxl_unet_twin"`` (same block layout and layer
            names, tiny widths: for CPU tests). A ``.json`` suffix is accepted.

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: ``name`` is not one of :data:`UNET_CONFIGS`.
    """
    return load_shipped_config(name, UNET_CONFIGS)


def load_shipped_config(name: str, choices) -> dict:
    """The config ``name`` (one of ``choices``; a ``.json`` suffix is accepted) from ``configs/``."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    stem = name[:-5] if name.endswith(".json") else name
    if stem not in choices:
        raise ValueError(f"name must be one of {list(choices)}, got {name!r}")
    text = resources.files(__package__).joinpath("configs", f"{stem}.json").read_text(encoding="utf-8")
    return json.loads(text)


def unet_from_config(name: str, **overrides):
    r"""A randomly initialised ``UNet2DConditionModel`` from a shipped config (nothing downloaded).

    Args:
        name (`str`): see :func:`load_unet_config`.
        **overrides: config entries to change (e.g. ``sample_size=32``).
    """
    from diffusers import UNet2DConditionModel

    config = load_unet_config(name)
    config.update(overrides)
    return UNet2DConditionModel.from_config(config)


__all__ = ["UNET_CONFIGS", "load_unet_config", "unet_from_config"]
