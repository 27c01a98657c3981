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


__all__ = ["FAMILIES", "Family", "detect_family", "processor_modules"]
