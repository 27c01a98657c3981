"""SeFi-IDE training: learn one subject's stage token pairs from one (or a few) images.

Per step: a random resized crop / flip of a subject image is encoded by the VAE, noised at a random
timestep ``t``; the token module gives the (P^K, P^V) pair of ``t``'s stage; the training prompt
(``template`` with the placeholder) is encoded twice through the frozen text encoder(s), once with P^K
(the key states, ``encoder_hidden_states``) and once with P^V (the value states, routed to ``to_v``
only); the reference prompt (``template`` with the class word) gives the reference key states. The loss
is

    loss = MSE(unet(x_t, t, K, V), target) + λ · subject_loss

with ``target`` the noise (epsilon prediction) or ``v`` (v-prediction) per the scheduler config, and
``subject_loss`` the mean over all cross-attention layers of ``mean((A_t − A_r)²)`` over the prompt's
real tokens (start to end-of-text), ``A_t``/``A_r`` the head-averaged maps of the target keys and the
reference keys under the same queries (:func:`semfid.subject_attention`). Only the token module trains.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from . import io
from .io import SefiInputError
from .text import PromptEncoder, TextStates, subject_token_indices
from .tokens import MODES, SefiTokens, stage_of

Tensor = torch.Tensor
PathLike = Union[str, os.PathLike]

MIXED_PRECISION = ("no", "fp16", "bf16")
#: default learning rate per token-module mode (the generator's output projection moves all 2·S·n
#: vectors at once; free vectors follow textual inversion's usual rate).
DEFAULT_LR = {"attention": 1e-4, "direct": 5e-3}


@dataclass
class TrainConfig:
    r"""Everything that defines a SeFi-IDE training run (the CLI options map onto these fields).

    Args:
        placeholder (`str`, defaults to ``"<v*>"``): the new token; must not contain whitespace or ``{}``.
        class_word (`str`, defaults to ``"person"``): the reference prompt's subject word.
        initializer (`str`, *optional*): word whose embedding initialises the tokens; defaults to
            ``class_word``.
        template (`str`, defaults to ``"a photo of the face of {}"``): training prompt; ``{}`` is the
            placeholder (target) or the class word (reference).
        stages (`int`, defaults to 5): S.
        num_vectors (`int`, defaults to 1): n, token vectors per P^K / P^V.
        mode (`str`, defaults to ``"attention"``): token module (``"attention"`` or ``"direct"``).
        steps (`int`, defaults to 500): optimisation steps.
        resolution (`int`, *optional*): training crop side in pixels; defaults to the UNet's native
            size (512 for SD1.5, 1024 for SDXL).
        batch_size (`int`, defaults to 1): crops per step (per process).
        lr (`float`, *optional*): AdamW learning rate; defaults to :data:`DEFAULT_LR` of the mode.
        weight_decay (`float`, defaults to 1e-2): AdamW weight decay.
        attn_loss_weight (`float`, defaults to 0.003): λ.
        seed (`int`, defaults to 0): seed of initialisation, crops, noise and timesteps.
        mixed_precision (`str`, *optional*): ``"no"``, ``"fp16"`` or ``"bf16"``; defaults to
            ``"fp16"`` on a GPU and ``"no"`` on CPU. The frozen models are stored in that half dtype.
        gradient_checkpointing (`bool`, defaults to False): checkpoint the UNet blocks.
        checkpoint_every (`int`, defaults to 100): save a resumable checkpoint every N steps (0: never).
        checkpoints_total_limit (`int`, defaults to 2): checkpoints kept (oldest removed).
        min_crop (`float`, defaults to 0.8): smallest crop side as a fraction of the short image side.
        flip (`bool`, defaults to True): random horizontal flips.
        variant (`str`, *optional*): weight variant of the pipeline folder (``"fp16"``).
    """

    placeholder: str = "<v*>"
    class_word: str = "person"
    initializer: Optional[str] = None
    template: str = "a photo of the face of {}"
    stages: int = 5
    num_vectors: int = 1
    mode: str = "attention"
    steps: int = 500
    resolution: Optional[int] = None
    batch_size: int = 1
    lr: Optional[float] = None
    weight_decay: float = 1e-2
    attn_loss_weight: float = 0.003
    seed: int = 0
    mixed_precision: Optional[str] = None
    gradient_checkpointing: bool = False
    checkpoint_every: int = 100
    checkpoints_total_limit: int = 2
    min_crop: float = 0.8
    flip: bool = True
    variant: Optional[str] = None

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
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise SefiInputError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
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
        return float(self.lr) if self.lr is not None else DEFAULT_LR[self.mode]


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def _uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return float(low + (high - low) * torch.rand((), generator=generator))


def random_crop(image, resolution: int, generator: torch.Generator, min_crop: float = 0.8,
                flip: bool = True) -> Tuple[Tensor, Tuple[int, int, int, int, int, int]]:
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


# ------------------------------------------------------------------------------------------------
# the trainer
# ------------------------------------------------------------------------------------------------
class SefiTrainer:
    r"""One SeFi-IDE training run on loaded pipeline components.

    Args:
        components (:class:`~semfid.sefi.io.Components`): the frozen pipeline parts, on their device.
        images (`list` of `PIL.Image.Image`): subject images.
        config (:class:`TrainConfig`): validated configuration.
        accelerator (`accelerate.Accelerator`, *optional*): device placement, mixed precision and
            distributed training; a plain single-process one is created when omitted.

    Attributes:
        tokens (:class:`~semfid.sefi.tokens.SefiTokens`): the trainable module (wrapped by the
            accelerator when distributed).
        tokens_indices, ref_token_indices (`List[int]`): subject-loss token positions.
    """

    def __init__(self, components: io.Components, images: Sequence, config: TrainConfig, accelerator=None):
        from accelerate import Accelerator
        from diffusers import DDPMScheduler

        from ..diffusers import install

        self.components, self.images, self.config = components, list(images), config
        self.accelerator = accelerator or Accelerator(mixed_precision=config.mixed_precision or "no")
        acc = self.accelerator
        self.device = acc.device
        self.kind = components.kind
        unet = components.unet
        self.vae_scale = 2 ** (len(components.vae.config.block_out_channels) - 1)
        self.resolution = int(config.resolution or unet.config.sample_size * self.vae_scale)
        self.noise_scheduler = DDPMScheduler.from_config(components.scheduler.config)
        self.num_train_timesteps = int(self.noise_scheduler.config.num_train_timesteps)
        self.encoder = PromptEncoder(components.tokenizers, components.text_encoders, self.kind)

        self.generator = torch.Generator().manual_seed(int(config.seed) + acc.process_index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(config.seed))
            init = self.encoder.word_embeddings(config.initializer or config.class_word)
            tokens = SefiTokens(init, config.stages, config.num_vectors, config.mode)
        optimizer = torch.optim.AdamW(tokens.parameters(), lr=config.learning_rate,
                                      weight_decay=config.weight_decay)
        self.tokens, self.optimizer = acc.prepare(tokens, optimizer)

        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.controller = install(unet)

        counts = {config.placeholder: config.num_vectors}
        prompt = config.template.format(config.placeholder)
        self.layouts = self.encoder.layout(prompt, counts)
        ref_layouts = self.encoder.layout(prompt, counts, substitute={config.placeholder: config.class_word})
        self.token_indices, self.ref_token_indices = subject_token_indices(self.layouts[0], ref_layouts[0])
        with torch.no_grad():
            self.reference = self.encoder.encode([ref_layouts])
        self.step_count = 0

    # -- pieces ---------------------------------------------------------------------------------
    @property
    def token_module(self) -> SefiTokens:
        """The bare token module (unwrapped from DDP)."""
        return self.accelerator.unwrap_model(self.tokens)

    def sample_batch(self) -> Tuple[Tensor, Tensor]:
        """Random crops: pixels [B, 3, R, R] in [-1, 1] and SDXL time ids [B, 6]."""
        pixels, time_ids = [], []
        for _ in range(self.config.batch_size):
            index = int(torch.randint(0, len(self.images), (), generator=self.generator))
            p, ids = random_crop(self.images[index], self.resolution, self.generator,
                                 self.config.min_crop, self.config.flip)
            pixels.append(p)
            time_ids.append(torch.tensor(ids, dtype=torch.float32))
        return torch.stack(pixels), torch.stack(time_ids)

    def text_states(self, stages: Tensor) -> Tuple[TextStates, TextStates]:
        r"""Key and value text states of the training prompt for each sample's stage.

        Returns:
            ``(keys, values)``: :class:`TextStates` with ``hidden`` [B, 77, D] (and ``pooled``).
        """
        pairs = self.tokens(stages)  # per encoder (P^K [B, n, d], P^V [B, n, d])
        batch = stages.numel()
        ph = self.config.placeholder
        key_fills = [{ph: [k[b] for k, _ in pairs]} for b in range(batch)]
        value_fills = [{ph: [v[b] for _, v in pairs]} for b in range(batch)]
        both = self.encoder.encode([self.layouts] * (2 * batch), key_fills + value_fills)
        pooled = both.pooled
        keys = TextStates(both.hidden[:batch], None if pooled is None else pooled[:batch])
        values = TextStates(both.hidden[batch:], None if pooled is None else pooled[batch:])
        return keys, values

    def losses(self, pixels: Tensor, time_ids: Optional[Tensor] = None, timesteps: Optional[Tensor] = None,
               noise: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        r"""The two loss terms of one batch (differentiable w.r.t. the token module).

        Args:
            pixels (`Tensor` [B, 3, R, R]): images in [-1, 1].
            time_ids (`Tensor` [B, 6], *optional*): SDXL micro-conditioning (required for SDXL).
            timesteps (`Tensor` [B], *optional*): drawn uniformly when omitted.
            noise (`Tensor` [B, 4, R/8, R/8], *optional*): drawn when omitted.

        Returns:
            ``(mse, subject)``: scalar float32 tensors; the objective is ``mse + λ · subject``.
        """
        comps, gen = self.components, self.generator
        vae, unet = comps.vae, comps.unet
        batch = pixels.shape[0]
        with torch.no_grad():
            dist = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
            eps = torch.randn(dist.mean.shape, generator=gen).to(self.device, dist.mean.dtype)
            latents = (dist.mean + dist.std * eps) * vae.config.scaling_factor
            latents = latents.to(unet.dtype)
        if noise is None:
            noise = torch.randn(latents.shape, generator=gen)
        noise = noise.to(self.device, latents.dtype)
        if timesteps is None:
            timesteps = torch.randint(0, self.num_train_timesteps, (batch,), generator=gen)
        timesteps = timesteps.to(self.device).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = diffusion_target(self.noise_scheduler, latents, noise, timesteps)

        stages = stage_of(timesteps.cpu(), self.config.stages, self.num_train_timesteps)
        keys, values = self.text_states(stages)
        added = None
        if self.kind == "sdxl":
            # the pooled text_embeds enter the time embedding, which shapes every query: they come
            # from the K-prompt, so P^V reaches nothing but to_v
            if time_ids is None:
                raise ValueError("SDXL training needs time_ids [B, 6]")
            added = {"text_embeds": keys.pooled, "time_ids": time_ids.to(self.device, keys.hidden.dtype)}
        reference = self.reference.hidden.expand(batch, -1, -1)
        with self.controller.subject_loss(reference, self.token_indices, ref_tokens=self.ref_token_indices,
                                          value_states=values.hidden, head_reduce="mean") as rec:
            pred = unet(noisy, timesteps, encoder_hidden_states=keys.hidden, added_cond_kwargs=added).sample
        mse = F.mse_loss(pred.float(), target.float())
        return mse, rec.loss.float().mean()

    def step(self) -> Tuple[float, float]:
        """One optimisation step; returns the (mse, subject) loss values."""
        pixels, time_ids = self.sample_batch()
        self.tokens.train()
        with self.accelerator.autocast():
            mse, subject = self.losses(pixels, time_ids)
            loss = mse + self.config.attn_loss_weight * subject
        self.accelerator.backward(loss)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return float(mse.detach()), float(subject.detach())

    # -- persistence ----------------------------------------------------------------------------
    def describe(self) -> dict:
        """The JSON written beside the tokens: subject, model dims and training arguments."""
        cfg = self.config
        dims = io.model_dims(self.components)
        return dict(
            dims,
            placeholder=cfg.placeholder, class_word=cfg.class_word,
            initializer=cfg.initializer or cfg.class_word, template=cfg.template,
            num_stages=cfg.stages, num_vectors=cfg.num_vectors, mode=cfg.mode,
            prediction_type=str(self.noise_scheduler.config.prediction_type),
            training=dict(dataclasses.asdict(cfg), resolution=self.resolution, lr=cfg.learning_rate,
                          steps_done=self.step_count, model=self.components.path),
            semfid_version=_version(),
        )

    def save(self, output: PathLike) -> Path:
        """Write the learned tokens (safetensors + JSON) to ``output``."""
        module = self.token_module
        with torch.no_grad():
            pairs = [p.detach().float().cpu() for p in module.all_pairs()]
        return io.save_learned(output, pairs, module.state_dict(), self.describe())

    def save_checkpoint(self, output: PathLike) -> Path:
        """Write a resumable checkpoint and prune old ones."""
        folder = io.save_checkpoint(output, self.step_count, self.token_module.state_dict(),
                                    self.optimizer.state_dict(), self.generator.get_state(),
                                    _resume_key(self.config))
        root = Path(output) / io.CHECKPOINTS_DIR
        done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
        for old in done[: -self.config.checkpoints_total_limit]:
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
        return folder

    def load_checkpoint(self, checkpoint: io.Checkpoint) -> None:
        """Continue from a checkpoint of the same configuration."""
        want = _resume_key(self.config)
        if checkpoint.config and checkpoint.config != want:
            diff = sorted(k for k in want if checkpoint.config.get(k) != want[k])
            raise SefiInputError(f"the checkpoint was trained with different {', '.join(diff)}; "
                                 "resume with the same options")
        self.token_module.load_state_dict(checkpoint.module_state)
        self.optimizer.load_state_dict(checkpoint.optimizer_state)
        self.generator.set_state(checkpoint.generator_state)
        self.step_count = checkpoint.step


def _resume_key(cfg: TrainConfig) -> dict:
    """Options that must not change across a resume."""
    keep = ("placeholder", "class_word", "initializer", "template", "stages", "num_vectors", "mode",
            "batch_size", "seed", "resolution")
    return {k: getattr(cfg, k) for k in keep}


def _version() -> str:
    from .. import __version__

    return __version__


# ------------------------------------------------------------------------------------------------
# the entry point
# ------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What :func:`train` returns: the output folder and the per-step loss terms of this process."""

    output: Path
    mse: List[float] = field(default_factory=list)
    subject: List[float] = field(default_factory=list)


def _pick_mixed_precision(requested: Optional[str]) -> str:
    if requested is None:
        return "fp16" if torch.cuda.is_available() else "no"
    if requested == "fp16" and not torch.cuda.is_available():
        raise SefiInputError("--mixed-precision fp16 needs a CUDA GPU (use bf16 or no on CPU)")
    return requested


def train(model: PathLike, images: Sequence[PathLike], output: PathLike, *,
          resume: Optional[Union[str, PathLike]] = None, progress: bool = True, **options) -> TrainResult:
    r"""Learn a SeFi-IDE subject from images with a local SD1.5 / SDXL diffusers pipeline.

    Args:
        model (`str` or `os.PathLike`): the diffusers pipeline folder (SD1.5 or SDXL, detected).
        images (`Sequence[str or os.PathLike]`): one or a few subject images.
        output (`str` or `os.PathLike`): folder for ``sefi_tokens.safetensors``, ``sefi_config.json``
            and ``checkpoints/``.
        resume (`str` or `os.PathLike`, *optional*): ``"latest"`` (the newest checkpoint in
            ``output``) or a checkpoint folder.
        progress (`bool`, *optional*, defaults to True): show a tqdm bar with both loss terms.
        **options: fields of :class:`TrainConfig` (``steps``, ``placeholder``, ``class_word``,
            ``template``, ``stages``, ``attn_loss_weight``, ``lr``, ``seed``, ``mixed_precision``,
            ``gradient_checkpointing``, ...).

    Returns:
        :class:`TrainResult`.

    Raises:
        SefiInputError: bad input (checked before anything is written).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    unknown = set(options) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise TypeError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    config = TrainConfig(**options).validate()
    output = Path(output)
    pil_images = io.load_images(images)
    kind = io.detect_kind(model)
    checkpoint = None
    if resume is not None:
        folder = io.latest_checkpoint(output) if str(resume) == "latest" else Path(resume)
        if folder is None:
            raise SefiInputError(f"--resume: {output} holds no checkpoint")
        checkpoint = io.load_checkpoint(folder)
    elif (output / io.TOKENS_FILE).exists() or io.latest_checkpoint(output) is not None:
        raise SefiInputError(f"{output} already holds a training run; pass --resume to continue it or "
                             "choose another --output")
    if output.exists() and not output.is_dir():
        raise SefiInputError(f"--output {output} exists and is not a folder")

    config.mixed_precision = _pick_mixed_precision(config.mixed_precision)
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    on_gpu = accelerator.device.type == "cuda"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    components = io.load_components(model, device=accelerator.device,
                                    dtype=dtype if on_gpu else torch.float32, variant=config.variant)
    if components.kind != kind:
        raise RuntimeError("pipeline kind changed while loading")
    trainer = SefiTrainer(components, pil_images, config, accelerator)
    try:
        if checkpoint is not None:
            trainer.load_checkpoint(checkpoint)
        result = TrainResult(output)
        bar = tqdm(total=config.steps, initial=trainer.step_count, desc="semfid-train", dynamic_ncols=True,
                   disable=not (progress and accelerator.is_main_process))
        while trainer.step_count < config.steps:
            mse, subject = trainer.step()
            result.mse.append(mse)
            result.subject.append(subject)
            bar.update(1)
            bar.set_postfix(mse=f"{mse:.4f}", attn=f"{subject:.3e}")
            every = config.checkpoint_every
            if every and trainer.step_count % every == 0 and trainer.step_count < config.steps:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    trainer.save_checkpoint(output)
        bar.close()
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            trainer.save(output)
    finally:
        trainer.controller.uninstall()
    return result


__all__ = ["train", "TrainConfig", "TrainResult", "SefiTrainer", "stage_of", "random_crop",
           "diffusion_target", "DEFAULT_LR"]
