"""Per-token attention heatmaps: a colour ramp over the generated image, labelled with the token.

One PNG per prompt token (start and end excluded) of every generated image:
``FOLDER/{prompt:02d}-s{seed}/{position:02d}-{token}.png``, the image plus a label strip on top.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Sequence

from ..diffusers.heatmaps import heatmap_image
from .files import PathLike
from .images import save_image
from .sample import GeneratedImage


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
