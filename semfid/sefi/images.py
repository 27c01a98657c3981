"""Reading the subject images and writing generated images and heatmaps."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .errors import SefiInputError
from .files import PathLike, atomic_write


#: Most pixels of a subject image (a 8192 × 8192 photo); larger ones are refused before decoding.
MAX_IMAGE_PIXELS = 8192 * 8192
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_WITH_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")
_PLAIN = ("RGB", "L", "P", "1", "CMYK", "YCbCr", "LAB", "HSV")


def to_rgb(image, name: str = "image"):
    r"""An 8-bit RGB copy of a PIL image that keeps what it shows.

    16-bit grayscale (``I;16``, or ``I`` with values up to 65535) is scaled by 255 / 65535 instead of
    being clipped; float images (``F``) must hold values in [0, 1]; transparent pixels (an alpha
    channel or a palette's transparency) are composited over white; palette, 1-bit, CMYK... convert
    as PIL converts them.

    Raises:
        SefiInputError: a mode with no faithful 8-bit RGB form.
    """
    import numpy as np
    from PIL import Image

    mode = image.mode
    if mode in _SIXTEEN_BIT or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        top = 1.0 if mode == "F" else 65535.0
        if values.size and (values.min() < 0 or values.max() > top):
            raise SefiInputError(f"{name}: {mode} pixel values must lie in [0, {top:g}], got "
                                 f"[{values.min():g}, {values.max():g}]")
        gray = np.round(values * (255.0 / top)).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1), "RGB")
    if mode in _WITH_ALPHA or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in _PLAIN:
        return image.convert("RGB")
    raise SefiInputError(f"{name}: image mode {mode} is not supported (expected RGB, grayscale, 16-bit "
                         "grayscale, palette, CMYK or with alpha)")


def load_images(paths: Sequence[PathLike]) -> list:
    r"""Open and decode every image (8-bit RGB PIL images, see :func:`to_rgb`), failing on the first bad one.

    Raises:
        SefiInputError: a path is missing, is not a decodable image, is larger than
            :data:`MAX_IMAGE_PIXELS` or has an unsupported mode.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    if not paths:
        raise SefiInputError("give at least one --image")
    images = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise SefiInputError(f"--image {path} does not exist" if not path.exists() else
                                 f"--image {path} is not a file")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit follows
                with Image.open(path) as im:
                    width, height = im.size
                    if width * height > MAX_IMAGE_PIXELS or min(width, height) < 1:
                        raise SefiInputError(f"--image {path} is {width} x {height} pixels; expected at most "
                                             f"{MAX_IMAGE_PIXELS} pixels (8192 x 8192)")
                    im.load()
                    images.append(to_rgb(im, f"--image {path}"))
        except Image.DecompressionBombError as exc:
            raise SefiInputError(f"--image {path} is too large ({exc}); expected at most {MAX_IMAGE_PIXELS} "
                                 "pixels (8192 x 8192)") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
            if isinstance(exc, SefiInputError):
                raise
            raise SefiInputError(f"--image {path}: cannot decode image ({exc})") from None
    return images


def save_image(image, path: PathLike) -> Path:
    """Save a PIL image atomically; the format follows the file suffix."""
    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
    return atomic_write(path, lambda tmp: image.save(tmp, format=fmt))


__all__ = ["load_images", "save_image"]
