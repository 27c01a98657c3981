"""The options of a training run and of a generation run, each declared once.

Every field's default and help text live here; :mod:`semfid.sefi.cli` turns the fields into flags
(``class_word`` -> ``--class-word``), :func:`~semfid.sefi.train.train` and
:func:`~semfid.sefi.generate.generate` take them as keyword arguments, and the class docstrings list
them (see :mod:`semfid.sefi.options`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from .errors import SefiInputError
from .options import document, option
from .tokens import MODES

MIXED_PRECISION = ("no", "fp16", "bf16")
#: default learning rate per token-module mode (the generator's output projection moves all 2·S·n
#: vectors at once; free vectors follow textual inversion's usual rate).
DEFAULT_LR = {"attention": 1e-4, "direct": 5e-3}


def _variant_option():
    return option(None, "weight variant of the pipeline folder, e.g. fp16", type=str)


def _check_resolution(resolution: Optional[int]) -> None:
    if resolution is not None and (resolution < 8 or resolution % 8):
        raise SefiInputError(f"--resolution must be a positive multiple of 8, got {resolution}")


@document
@dataclass
class TrainConfig:
    r"""Everything that defines a SeFi-IDE training run (the ``semfid-train`` options map onto these fields)."""

    placeholder: str = option("<v*>", "the new token; no whitespace or '{}'")
    class_word: str = option("person", "subject class of the reference prompt")
    initializer: Optional[str] = option(None, "word whose embedding initialises the tokens (default: the "
                                              "class word)", type=str)
    template: str = option("a photo of the face of {}", "training prompt, {} = placeholder / class word")
    stages: int = option(5, "timestep stages S")
    num_vectors: int = option(1, "vectors per P^K / P^V")
    mode: str = option("attention", "token module: self-attention generator (attention) or free vectors "
                                    "(direct)", choices=MODES)
    steps: int = option(500, "optimisation steps")
    resolution: Optional[int] = option(None, "crop side in px (default: native 512 / 1024)", type=int)
    batch_size: int = option(1, "crops per step and process")
    lr: Optional[float] = option(None, "AdamW learning rate (default " + ", ".join(
        f"{lr:g} {mode}" for mode, lr in DEFAULT_LR.items()) + ")", type=float)
    weight_decay: float = option(1e-2, "AdamW weight decay", cli=False)
    attn_loss_weight: float = option(0.003, "λ of the subject loss")
    seed: int = option(0, "seed of initialisation, crops, noise and timesteps")
    mixed_precision: Optional[str] = option(None, "default: fp16 on a GPU, no on CPU; the frozen models are "
                                                  "stored in that half dtype", type=str, choices=MIXED_PRECISION)
    gradient_checkpointing: bool = option(False, "checkpoint the UNet blocks")
    checkpoint_every: int = option(100, "resumable checkpoint every N steps (0: never)")
    checkpoints_total_limit: int = option(2, "checkpoints kept (oldest removed)", cli=False)
    min_crop: float = option(0.8, "smallest crop side as a fraction of the short image side", cli=False)
    flip: bool = option(True, "random horizontal flips", cli=False)
    variant: Optional[str] = _variant_option()

    def validate(self) -> "TrainConfig":
        """Check every field; raises :class:`SefiInputError` naming the option."""
        if not self.placeholder or any(c.isspace() for c in self.placeholder) or "{}" in self.placeholder:
            raise SefiInputError(f"--placeholder must be a non-empty string without spaces or '{{}}', "
                                 f"got {self.placeholder!r}")
        if not self.class_word.strip():
            raise SefiInputError("--class-word must not be empty")
        if self.initializer is not None and not self.initializer.strip():
            raise SefiInputError("--initializer must not be empty")
        if self.template.count("{}") != 1:
            raise SefiInputError(f"--template must contain '{{}}' exactly once, got {self.template!r}")
        if self.placeholder in self.template or self.placeholder in self.class_word:
            raise SefiInputError(f"the placeholder {self.placeholder!r} already appears in the template "
                                 "or class word")
        for name in ("stages", "num_vectors", "steps", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise SefiInputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.mode not in MODES:
            raise SefiInputError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        _check_resolution(self.resolution)
        if self.lr is not None and not self.lr > 0:
            raise SefiInputError(f"--lr must be > 0, got {self.lr}")
        if not (self.attn_loss_weight >= 0 and math.isfinite(self.attn_loss_weight)):
            raise SefiInputError(f"--attn-loss-weight must be >= 0, got {self.attn_loss_weight}")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise SefiInputError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, "
                                 f"got {self.mixed_precision!r}")
        if self.checkpoint_every < 0 or self.checkpoints_total_limit < 1:
            raise SefiInputError("--checkpoint-every must be >= 0 and --checkpoints-total-limit >= 1")
        if not 0 < self.min_crop <= 1:
            raise SefiInputError(f"--min-crop must be in (0, 1], got {self.min_crop}")
        return self

    @property
    def learning_rate(self) -> float:
        """``lr``, or the mode's :data:`DEFAULT_LR`."""
        return float(self.lr) if self.lr is not None else DEFAULT_LR[self.mode]


@document
@dataclass
class GenerateConfig:
    r"""How ``semfid-generate`` samples (the options map onto these fields)."""

    steps: int = option(30, "denoising steps (the folder's scheduler)")
    resolution: Optional[int] = option(None, "image side (default: native 512 / 1024)", type=int)
    guidance_scale: float = option(7.5, "classifier-free guidance (<= 1 disables the unconditional half)")
    seeds: Sequence[int] = option((0,), "seed; one image per prompt and seed (repeatable)", flag="--seed",
                                  type=int, action="append")
    variant: Optional[str] = _variant_option()

    def validate(self) -> "GenerateConfig":
        """Check every field; raises :class:`SefiInputError` naming the option."""
        if not self.seeds:
            raise SefiInputError("give at least one seed")
        if self.steps < 1:
            raise SefiInputError(f"--steps must be >= 1, got {self.steps}")
        _check_resolution(self.resolution)
        return self


__all__ = ["TrainConfig", "GenerateConfig", "DEFAULT_LR", "MIXED_PRECISION"]
