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
import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .batches import diffusion_target, random_crop
from . import checks, schemas
from .checkpoints import (Checkpoint, OptionsDiffer, latest_checkpoint, pick_checkpoint, prune_checkpoints,
                          save_checkpoint)
from .config import TrainConfig
from .errors import SefiDivergedError, SefiInputError
from .images import load_images
from .learned import CONFIG_FILE, TOKENS_FILE, save_learned
from .options import check_option_names
from .pipeline import Components, detect_kind, load_components, load_tokenizers, model_dims
from .text import PromptEncoder, TextStates, subject_token_indices
from .tokens import SefiTokens, stage_of

Tensor = torch.Tensor
PathLike = Union[str, os.PathLike]

class SefiTrainer:
    r"""One SeFi-IDE training run on loaded pipeline components.

    Args:
        components (:class:`~semfid.sefi.pipeline.Components`): the frozen pipeline parts, on their device.
        images (`list` of `PIL.Image.Image`): subject images.
        config (:class:`~semfid.sefi.config.TrainConfig`): validated configuration.
        accelerator (`accelerate.Accelerator`, *optional*): device placement, mixed precision and
            distributed training; a plain single-process one is created when omitted.

    Attributes:
        tokens (:class:`~semfid.sefi.tokens.SefiTokens`): the trainable module (wrapped by the
            accelerator when distributed).
        tokens_indices, ref_token_indices (`List[int]`): subject-loss token positions.
    """

    def __init__(self, components: Components, images: Sequence, config: TrainConfig, accelerator=None):
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
        self.resumed_from: Optional[int] = None  # the checkpoint's step when resumed

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
        return self.encoder.encode_key_value([self.layouts] * stages.numel(), {self.config.placeholder: pairs})

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
        """One optimisation step; returns the (mse, subject) loss values.

        Raises:
            SefiDivergedError: the loss, or a token value after the update, is not finite (or a token
                exceeds :data:`~semfid.sefi.checks.MAX_TOKEN_ABS`); the step is not counted.
        """
        pixels, time_ids = self.sample_batch()
        self.tokens.train()
        with self.accelerator.autocast():
            mse, subject = self.losses(pixels, time_ids)
            loss = mse + self.config.attn_loss_weight * subject
        step = self.step_count + 1
        if not bool(torch.isfinite(loss.detach())):
            raise SefiDivergedError(f"training diverged at step {step}: the loss is {float(loss.detach())} "
                                    f"(mse {float(mse.detach())}, subject {float(subject.detach())})")
        self.accelerator.backward(loss)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            try:
                for e, pairs in enumerate(self.token_module.all_pairs()):
                    schemas.token_values(f"the tokens (encoder {e})", pairs)
            except SefiInputError as exc:
                raise SefiDivergedError(f"training diverged at step {step}: {exc}") from None
        self.step_count = step
        return float(mse.detach()), float(subject.detach())

    # -- persistence ----------------------------------------------------------------------------
    def describe(self) -> dict:
        """The JSON written beside the tokens: subject, model dims and training arguments."""
        cfg = self.config
        dims = model_dims(self.components)
        return dict(
            dims,
            placeholder=cfg.placeholder, class_word=cfg.class_word,
            initializer=cfg.initializer or cfg.class_word, template=cfg.template,
            num_stages=cfg.stages, num_vectors=cfg.num_vectors, mode=cfg.mode,
            prediction_type=str(self.noise_scheduler.config.prediction_type),
            training=dict(dataclasses.asdict(cfg), resolution=self.resolution, lr=cfg.learning_rate,
                          steps_done=self.step_count, resumed_from=self.resumed_from,
                          model=self.components.path),
            semfid_version=_version(),
        )

    def save(self, output: PathLike) -> Path:
        """Write the learned tokens (safetensors + JSON) to ``output``."""
        module = self.token_module
        with torch.no_grad():
            pairs = [p.detach().float().cpu() for p in module.all_pairs()]
        return save_learned(output, pairs, module.state_dict(), self.describe())

    def save_checkpoint(self, output: PathLike) -> Path:
        """Write a resumable checkpoint and prune old ones."""
        folder = save_checkpoint(output, self.step_count, self.token_module.state_dict(),
                                 self.optimizer.state_dict(), self.generator.get_state(), self.resume_key())
        prune_checkpoints(output, self.config.checkpoints_total_limit)
        return folder

    def load_checkpoint(self, checkpoint: Checkpoint, where: str = "the checkpoint") -> None:
        """Continue from a checkpoint of the same configuration (checked by :meth:`check_fits` first)."""
        self.check_fits(checkpoint, where)
        self.token_module.load_state_dict(checkpoint.module_state)
        self.optimizer.load_state_dict(checkpoint.optimizer_state)
        self.generator.set_state(checkpoint.generator_state)
        self.step_count = self.resumed_from = checkpoint.step

    def check_fits(self, checkpoint: Checkpoint, where: str = "the checkpoint") -> None:
        """:class:`OptionsDiffer` if the checkpoint was trained with other :meth:`resume_key` values,
        :class:`SefiInputError` unless its tensors fit the token module and the optimizer."""
        want = self.resume_key()
        diff = [k for k in want if k in checkpoint.config and checkpoint.config[k] != want[k]]
        if diff:
            shown = "; ".join(f"{_flag(k)} {_shown(checkpoint.config[k])} (now {_shown(want[k])})" for k in diff)
            raise OptionsDiffer(f"--resume: {where} was trained with other {', '.join(map(_flag, diff))}: {shown}; "
                                "a resume cannot change them (give the same options, or a new --output)")
        schemas.state_matches(self.token_module.state_dict(), checkpoint.module_state, where)
        schemas.optimizer_matches(checkpoint.optimizer_state, self.optimizer, where)

    def resume_key(self) -> dict:
        """What must not change across a resume: the options that shape the run and the images."""
        cfg = self.config
        keep = ("placeholder", "class_word", "initializer", "template", "stages", "num_vectors", "mode",
                "batch_size", "seed", "resolution", "attn_loss_weight", "weight_decay", "min_crop", "flip",
                "mixed_precision")
        key = {k: getattr(cfg, k) for k in keep}
        digest = hashlib.sha256()
        for im in self.images:
            digest.update(f"{im.size}{im.mode}".encode())
            digest.update(im.tobytes())
        return dict(key, lr=cfg.learning_rate, images=digest.hexdigest()[:16])


def _flag(key: str) -> str:
    return "--image" if key == "images" else "--" + key.replace("_", "-")


def _shown(value) -> str:
    return f"{value:g}" if isinstance(value, float) else repr(value)


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
        **options: fields of :class:`~semfid.sefi.config.TrainConfig` (``steps``, ``placeholder``, ``class_word``,
            ``template``, ``stages``, ``attn_loss_weight``, ``lr``, ``seed``, ``mixed_precision``,
            ``gradient_checkpointing``, ...).

    Returns:
        :class:`TrainResult`.

    Raises:
        SefiInputError: bad input (checked before anything is written), including a ``--resume`` that
            would change the run (see :meth:`SefiTrainer.resume_key`) or ``steps`` below the checkpoint's.
        SefiDivergedError: a non-finite loss or token value; names the step, the checkpoints stay.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    check_option_names(options, TrainConfig, "training")
    config = TrainConfig(**options).validate()
    output = checks.writable_folder("--output", output)
    if resume is None and (any((output / name).exists() for name in (TOKENS_FILE, CONFIG_FILE))
                           or latest_checkpoint(output) is not None):
        raise SefiInputError(f"--output {output} already holds a training run; pass --resume to continue it "
                             "or choose another --output")
    pil_images = load_images(images)
    kind = detect_kind(model)
    checks.not_a_word("--placeholder", config.placeholder, load_tokenizers(model))
    if resume is not None and str(resume) == "latest" and latest_checkpoint(output) is None:
        raise SefiInputError(f"--resume: {output} holds no checkpoint")

    config.mixed_precision = _pick_mixed_precision(config.mixed_precision)
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    on_gpu = accelerator.device.type == "cuda"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    components = load_components(model, device=accelerator.device,
                                 dtype=dtype if on_gpu else torch.float32, variant=config.variant)
    if components.kind != kind:
        raise RuntimeError("pipeline kind changed while loading")
    num_train_timesteps = int(components.scheduler.config.num_train_timesteps)
    if config.stages > num_train_timesteps:
        raise SefiInputError(f"--stages {config.stages} exceeds the scheduler's num_train_timesteps "
                             f"({num_train_timesteps})")
    trainer = SefiTrainer(components, pil_images, config, accelerator)
    try:
        if resume is not None:
            folder, checkpoint, skipped = pick_checkpoint(output, resume, trainer.check_fits)
            for line in skipped:
                print(f"semfid-train: warning: {line}; resuming from {folder.name}", file=sys.stderr)
            if checkpoint.step > config.steps:
                raise SefiInputError(f"--steps {config.steps} is below the step of the checkpoint it resumes "
                                     f"({checkpoint.step}, {folder}); give --steps >= {checkpoint.step}")
            trainer.load_checkpoint(checkpoint, str(folder))
        result = TrainResult(output)
        bar = tqdm(total=config.steps, initial=trainer.step_count, desc="semfid-train", dynamic_ncols=True,
                   disable=not (progress and accelerator.is_main_process))
        while trainer.step_count < config.steps:
            try:
                mse, subject = trainer.step()
            except SefiDivergedError as exc:
                bar.close()
                kept = latest_checkpoint(output)
                raise SefiDivergedError(f"{exc}; nothing more was written"
                                        + (f", the newest checkpoint {kept} stays" if kept else "")
                                        + " (lower --lr?)") from None
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


__all__ = ["train", "TrainResult", "SefiTrainer"]
