"""One labelled grid image of per-token heatmaps (DAAM / Prompt-to-Prompt style), with PIL only.

The tiles are :func:`semfid.sefi.heatmaps.heatmap_image` overlays (the generated image blended with
one token's map, the token written on a strip above); this module lays them out in rows.
Pillow's built-in bitmap font is used: nothing is fetched.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


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

    from ..sefi.heatmaps import heatmap_image

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


__all__ = ["heatmap_grid"]
