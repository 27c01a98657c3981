"""The options of a training run and of a generation run, each declared once.

Every field's default and help text live here; :mod:`semfid.sefi.cli` turns the fields into flags
(``class_word`` -> ``--class-word``), :func:`~semfid.sefi.train.train` and
:func:`~semfid.sefi.generate.generate` take them as keyword arguments, and the class docstrings list
them (see :mod:`semfid.sefi.options`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from . import checks
from .errors import SefiInputError
from .options import document, option
from .tokens import MODES

MIXED_PRECISION = ("no", "fp16", "bf16")
#: default learning rate per token-module mode (the generator's output projection moves all 2·S·n
#: vectors at once; free vectors follow textual inversion's usual rate).
DEFAULT_LR = {"attention": 1e-4, "direct": 5e-3}
#: upper limits of the options (beyond them a run is a typo, not a choice)
MAX_STEPS, MAX_BATCH, MAX_LR, MAX_LOSS_WEIGHT, MAX_GUIDANCE = 10 ** 7, 256, 10.0, 1e6, 100.0


def _variant_option():
    return option(None, "weight variant of the pipeline folder, e.g. fp16", type=str)


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
        """Check every field (:mod:`semfid.sefi.checks`); raises :class:`SefiInputError` naming the option."""
        checks.placeholder("--placeholder", self.placeholder)
        for name in ("class_word", "initializer"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip() or "{" in value
                                      or "}" in value):
                raise SefiInputError(f"--{name.replace('_', '-')} must be a non-empty word without braces, "
                                     f"got {value!r}")
        checks.template("--template", self.template)
        for where in (self.template, self.class_word, self.initializer or ""):
            if self.placeholder in where:
                raise SefiInputError(f"--placeholder {self.placeholder!r} already appears in {where!r} (the "
                                     "template, class word or initializer); choose another placeholder")
        if not checks.placeholder_pattern([self.placeholder]).search(self.template.format(self.placeholder)):
            raise SefiInputError(f"--template {self.template!r}: '{{}}' must stand as a word of its own (spaces "
                                 "or punctuation around it), so that the placeholder is one token")
        checks.integer("--stages", self.stages, 1, checks.MAX_STAGES)
        checks.integer("--num-vectors", self.num_vectors, 1, checks.MAX_VECTORS)
        checks.integer("--steps", self.steps, 1, MAX_STEPS)
        checks.integer("--batch-size", self.batch_size, 1, MAX_BATCH)
        checks.choice("--mode", self.mode, MODES)
        checks.resolution("--resolution", self.resolution)
        if self.lr is not None:
            checks.number("--lr", self.lr, 0, MAX_LR, low_open=True)
        checks.number("--attn-loss-weight", self.attn_loss_weight, 0, MAX_LOSS_WEIGHT)
        checks.number("weight_decay", self.weight_decay, 0, 1)
        checks.seed("--seed", self.seed)
        if self.mixed_precision is not None:
            checks.choice("--mixed-precision", self.mixed_precision, MIXED_PRECISION)
        checks.integer("--checkpoint-every", self.checkpoint_every, 0)
        checks.integer("checkpoints_total_limit", self.checkpoints_total_limit, 1)
        checks.number("min_crop", self.min_crop, 0, 1, low_open=True)
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
        """Check every field (:mod:`semfid.sefi.checks`); raises :class:`SefiInputError` naming the option."""
        if not self.seeds:
            raise SefiInputError("give at least one --seed")
        for s in self.seeds:
            checks.seed("--seed", s)
        checks.integer("--steps", self.steps, 1, MAX_STEPS)
        checks.resolution("--resolution", self.resolution)
        checks.number("--guidance-scale", self.guidance_scale, 0, MAX_GUIDANCE)
        return self


__all__ = ["TrainConfig", "GenerateConfig", "DEFAULT_LR", "MIXED_PRECISION"]
