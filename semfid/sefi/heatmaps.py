"""Per-token attention heatmaps: a colour ramp over the generated image, labelled with the token.

One PNG per prompt token (start and end excluded) of every generated image:
``FOLDER/{prompt:02d}-s{seed}/{position:02d}-{token}.png``, the image plus a label strip on top.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch

from .files import PathLike
from .images import save_image
from .sample import GeneratedImage

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


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "token"


def write_heatmaps(results: Sequence[GeneratedImage], folder: PathLike) -> List[Path]:
    """Write one labelled overlay PNG per prompt token of every result; returns the paths."""
    written = []
    for r in results:
        sub = Path(folder) / f"{r.prompt_index:02d}-s{r.seed}"
        sub.mkdir(parents=True, exist_ok=True)
        for j, (label, heat) in enumerate(zip(r.labels, r.maps)):
            path = sub / f"{j + 1:02d}-{_safe(label)}.png"
            written.append(save_image(heatmap_image(r.image, heat, label), path))
    return written


__all__ = ["heatmap_image", "write_heatmaps"]
