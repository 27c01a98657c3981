"""Reading the subject images and writing generated images and heatmaps."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .errors import SefiInputError
from .files import PathLike, atomic_write


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


__all__ = ["load_images", "save_image"]
