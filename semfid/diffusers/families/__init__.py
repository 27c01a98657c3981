"""Model families semfid installs on: which one a model is, and what is supported.

* ``unet`` — ``UNet2DConditionModel`` (SD1.5, SDXL, ...): :mod:`.unet`
* ``pixart`` — ``PixArtTransformer2DModel`` (PixArt-α / Σ): :mod:`.unet`
* ``sd3`` — ``SD3Transformer2DModel`` (SD3 medium, SD3.5 large / medium): :mod:`.sd3`
* ``flux`` — ``FluxTransformer2DModel`` (Flux.1 dev / schnell): :mod:`.flux`

:mod:`.base` holds what they share (the :class:`~.base.Family` interface the controller drives),
:mod:`.joint` the maps over joint key sets (SD3, Flux).
"""

from __future__ import annotations

import inspect
from typing import Dict

import torch

from .base import Family, processor_modules
from .flux import FluxFamily
from .sd3 import SD3Family
from .unet import PixArtFamily, UNetFamily

#: diffusers class name → family
FAMILIES = {
    "UNet2DConditionModel": UNetFamily,
    "PixArtTransformer2DModel": PixArtFamily,
    "SD3Transformer2DModel": SD3Family,
    "FluxTransformer2DModel": FluxFamily,
}


def detect_family(model) -> Family:
    r"""The :class:`~.base.Family` of ``model`` (by its diffusers class or a base class of it).

    A model of another class whose ``forward`` takes ``sample``, ``encoder_hidden_states`` and
    ``cross_attention_kwargs`` counts as a UNet (UNets built from diffusers' legacy blocks).

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.
        ValueError: ``model`` is of none of the supported kinds (the message lists them).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a diffusers model (torch.nn.Module), got {type(model).__name__}")
    for cls in type(model).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__](model)
    try:
        params = set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = set()
    if {"sample", "encoder_hidden_states", "cross_attention_kwargs"} <= params:
        return UNetFamily(model)
    raise ValueError(
        f"semfid.diffusers.install supports {', '.join(FAMILIES)} (SD1.5 / SDXL UNets, PixArt-Σ, "
        f"SD3 / SD3.5, Flux.1); got {type(model).__name__}, whose forward takes {sorted(params)}"
    )


def cross_attention_layers(model: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    r"""The attention modules of ``model`` whose keys include the text, by layer name: the layers
    :func:`~semfid.diffusers.install` can capture maps / compute the loss in (its ``layers`` choose
    among these names; ``ctl.cross_attention_layers`` lists the same).

    * UNet (SD1.5: 16, SDXL base: 70) and PixArt-Σ (28): the cross-attention ``attn2`` layers;
    * SD3 / SD3.5: every joint ``transformer_blocks.i.attn`` (keys [image, text]; not SD3.5
      medium's image-only ``attn2``);
    * Flux.1: every double-stream ``transformer_blocks.i.attn`` and single-stream
      ``single_transformer_blocks.i.attn`` (keys [text, image]).

    Args:
        model (`torch.nn.Module`): a diffusers model :func:`detect_family` accepts.

    Returns:
        `dict[str, torch.nn.Module]`: in ``named_modules`` order; the names are the keys of
        ``model.attn_processors`` without ``.processor``.

    Raises:
        TypeError / ValueError: as :func:`detect_family` (not a module, an unsupported model).
    """
    return detect_family(model).text_layers(processor_modules(model))


__all__ = ["FAMILIES", "Family", "cross_attention_layers", "detect_family", "processor_modules"]
