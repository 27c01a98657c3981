"""UNet2DConditionModel (SD1.5, SDXL, ...) and PixArt-Σ: diffusers' legacy ``Attention`` with a
separate cross-attention (``attn2``) per transformer block, keys = the text alone.

Both run :class:`~semfid.diffusers.processors.SemfidAttnProcessor` on every ``Attention`` module and
pass per-call state through ``cross_attention_kwargs``. They differ only in where the latents come
in (``sample`` / ``hidden_states``) and in the query grids: a UNet layer's grid is the latent halved
once per downsampler before it (:func:`~semfid.diffusers.layers.layer_levels`); every PixArt layer
sees the patch grid (latent side // ``patch_size``).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ..layers import grid_size, layer_levels
from ..processors import SemfidAttnProcessor
from .base import ArgGetter, Family, latent_grid, processor_modules


class UNetFamily(Family):
    """``UNet2DConditionModel`` and UNets built from the same legacy ``Attention`` blocks."""

    name = "unet"
    latent_arg = "sample"
    kwargs_arg = "cross_attention_kwargs"
    replaceable = ("AttnProcessor2_0", "AttnProcessor", "SemfidAttnProcessor")

    def __init__(self, model: torch.nn.Module):
        names = list(self.text_layers(processor_modules(model)))
        self._levels: Dict[str, Optional[int]] = layer_levels(model, names)

    def text_layers(self, modules):
        return {n: m for n, m in modules.items() if getattr(m, "is_cross_attention", False)}

    def make_processor(self, name, module, owner, active):
        return SemfidAttnProcessor(name, owner, active=active)

    def grids(self, get: ArgGetter, names):
        sample = get(self.latent_arg)
        if not (isinstance(sample, torch.Tensor) and sample.dim() == 4):
            return {}
        h, w = sample.shape[-2:]
        return {n: grid_size(h, w, self._levels.get(n)) for n in names}


class PixArtFamily(UNetFamily):
    """``PixArtTransformer2DModel`` (PixArt-α / Σ): 28 ``attn2`` layers over the 300 T5 keys."""

    name = "pixart"
    latent_arg = "hidden_states"

    def __init__(self, model: torch.nn.Module):
        self._patch = int(model.config.patch_size)

    def grids(self, get: ArgGetter, names):
        grid = latent_grid(get(self.latent_arg), self._patch)
        return {n: grid for n in names}


__all__ = ["UNetFamily", "PixArtFamily"]
