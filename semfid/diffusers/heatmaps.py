"""One labelled grid image of per-token heatmaps (DAAM / Prompt-to-Prompt style), with PIL only.

The tiles are :func:`heatmap_image` overlays (the generated image blended with one token's map, the
token written on a strip above); :func:`heatmap_grid` lays them out in rows. (The SeFi-IDE recipe's
per-token files, :mod:`semfid.sefi.heatmaps`, reuse the overlay.)
Pillow's built-in bitmap font is used: nothing is fetched.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

Tensor = torch.Tensor


def _colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → RGB uint8 on a dark-blue → cyan → yellow → red ramp."""
    stops = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    colours = np.array([[0, 0, 80], [0, 90, 255], [0, 230, 230], [255, 230, 0], [230, 0, 0]], dtype=np.float64)
    rgb = np.stack([np.interp(values, stops, colours[:, c]) for c in range(3)], axis=-1)
    return rgb.clip(0, 255).astype(np.uint8)


def heatmap_image(image, heat: Tensor, label: str, alpha: float = 0.55):
    r"""Overlay one token's map on ``image`` and write ``label`` on a strip at the top.

    Args:
        image (`PIL.Image.Image`): the generated RGB image.
        heat (`Tensor` [h, w]): the token's map (any scale; min-max normalised here).
        label (`str`): the token.
        alpha (`float`, *optional*, defaults to 0.55): heatmap opacity.

    Returns:
        `PIL.Image.Image`: RGB, same size as ``image`` plus a label strip.
    """
    from PIL import Image, ImageDraw, ImageFont

    h = heat.detach().float().cpu().numpy()
    h = (h - h.min()) / max(float(h.max() - h.min()), 1e-12)
    small = Image.fromarray(_colormap(h))
    coloured = small.resize(image.size, Image.BILINEAR)
    blended = Image.blend(image.convert("RGB"), coloured, alpha)
    font = ImageFont.load_default()
    strip = max(12, image.size[1] // 12)
    canvas = Image.new("RGB", (image.size[0], image.size[1] + strip), (0, 0, 0))
    canvas.paste(blended, (0, strip))
    ImageDraw.Draw(canvas).text((2, max(0, (strip - 11) // 2)), label, fill=(255, 255, 255), font=font)
    return canvas


def heatmap_grid(heat: torch.Tensor, labels: Optional[Sequence[str]] = None, *, image=None,
                 columns: Optional[int] = None, tile: int = 256):
    r"""Lay out one image's per-token maps as a labelled grid.

    Args:
        heat (`torch.Tensor` [S, h, w]): one map per token (any scale; each min-max normalised).
        labels (*optional*): S labels (defaults to ``"token 0"``, ...).
        image (`PIL.Image.Image`, *optional*): the generated image; shown first (labelled "image")
            and under each map. Without it the maps are drawn on black.
        columns (*optional*): tiles per row (defaults to ~sqrt(S + 1)).
        tile (`int`, *optional*): tile side in pixels when no ``image`` is given.

    Returns:
        `PIL.Image.Image` RGB.
    """
    from PIL import Image

    if not isinstance(heat, torch.Tensor) or heat.dim() != 3 or heat.shape[0] == 0:
        raise ValueError(f"heat must be a [S, h, w] tensor with S >= 1, got {getattr(heat, 'shape', heat)!r}")
    s = heat.shape[0]
    labels = [f"token {i}" for i in range(s)] if labels is None else [str(x) for x in labels]
    if len(labels) != s:
        raise ValueError(f"labels must give one label per map ({s}), got {len(labels)}")
    base = image.convert("RGB") if image is not None else Image.new("RGB", (tile, tile))
    tiles = [heatmap_image(base, heat[i].float().cpu(), labels[i]) for i in range(s)]
    if image is not None:
        tiles.insert(0, heatmap_image(base, torch.zeros(2, 2), "image", alpha=0.0))
    cols = columns or max(1, math.ceil(math.sqrt(len(tiles))))
    rows = math.ceil(len(tiles) / cols)
    w, h = tiles[0].size
    canvas = Image.new("RGB", (cols * w, rows * h), (0, 0, 0))
    for i, t in enumerate(tiles):
        canvas.paste(t, ((i % cols) * w, (i // cols) * h))
    return canvas


__all__ = ["heatmap_image", "heatmap_grid"]
