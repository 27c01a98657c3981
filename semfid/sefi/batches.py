"""What one training step sees: a random crop of a subject image and the diffusion target."""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

from .config import TrainConfig
from .errors import SefiInputError

Tensor = torch.Tensor


def _uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return float(low + (high - low) * torch.rand((), generator=generator))


def random_crop(image, resolution: int, generator: torch.Generator, min_crop: float = TrainConfig.min_crop,
                flip: bool = TrainConfig.flip) -> Tuple[Tensor, Tuple[int, int, int, int, int, int]]:
    r"""A random square crop of ``image``, resized to ``resolution``, maybe flipped.

    Args:
        image (`PIL.Image.Image`): RGB image.
        resolution (`int`): output side.
        generator (`torch.Generator`): source of randomness (CPU).
        min_crop (`float`): smallest crop side as a fraction of the short image side.
        flip (`bool`): flip horizontally with probability 1/2.

    Returns:
        ``(pixels, time_ids)``: pixels [3, R, R] float32 in [-1, 1]; SDXL's micro-conditioning
        ``(orig_h, orig_w, crop_top, crop_left, R, R)`` with the crop corner in output pixels.
    """
    from PIL import Image

    width, height = image.size
    side = max(1, int(round(min(width, height) * _uniform(generator, min_crop, 1.0))))
    top = int(torch.randint(0, height - side + 1, (), generator=generator))
    left = int(torch.randint(0, width - side + 1, (), generator=generator))
    crop = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    if flip and _uniform(generator) < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    s = resolution / side
    return pixels, (height, width, int(round(top * s)), int(round(left * s)), resolution, resolution)


def diffusion_target(scheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the UNet should predict: the noise (``epsilon``) or ``v`` (``v_prediction``)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise SefiInputError(f"the scheduler's prediction_type {kind!r} is not supported (epsilon, v_prediction)")


__all__ = ["random_crop", "diffusion_target"]
