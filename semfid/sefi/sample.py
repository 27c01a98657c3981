"""SeFi-IDE sampling: classifier-free guidance with each placeholder's stage pair of the current timestep.

At every denoising step each placeholder of a prompt takes the (P^K, P^V) pair of the current
timestep's stage (its own S); the prompt is encoded twice through the frozen text encoder(s), once with
the P^K vectors (the key states, ``encoder_hidden_states``) and once with the P^V vectors (the value
states, routed to ``to_v`` only by :meth:`semfid.diffusers.SemfidController.values`). Under
classifier-free guidance the unconditional half keeps the pipeline's normal empty-prompt states (SDXL:
zeros when the folder sets ``force_zeros_for_empty_prompt``) for both keys and values.

Attention maps (``with_maps``): the head-averaged cross-attention maps of the conditional half, averaged
over the denoising steps and over the layers at 1/4 and 1/2 of the latent side (16×16 and 32×32 for
SD1.5 at 512 px; 32×32 and 64×64 for SDXL at 1024 px, which has no 16×16 cross-attention).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .config import GenerateConfig
from .learned import LearnedSubject
from .pipeline import Components
from .text import PromptEncoder, PromptLayout, TextStates
from .tokens import fixed_pairs, stage_of

Tensor = torch.Tensor


@dataclass
class GeneratedImage:
    r"""One generated image.

    Attributes:
        prompt (`str`), prompt_index (`int`), seed (`int`).
        image (`PIL.Image.Image`): RGB.
        labels (`List[str]`): one per prompt token (start/end excluded) when maps were requested.
        maps (`Tensor` [T, h, w], *optional*): the aggregated map of each labelled token, float32.
        path (`Path`, *optional*): where the image was written.
    """

    prompt: str
    prompt_index: int
    seed: int
    image: object
    labels: List[str] = field(default_factory=list)
    maps: Optional[Tensor] = None
    path: Optional[Path] = None


class SefiSampler:
    r"""Classifier-free-guided sampling with per-stage K/V token pairs of one or more subjects.

    Args:
        components (:class:`~semfid.sefi.pipeline.Components`): the loaded pipeline parts.
        subjects (`Sequence[LearnedSubject]`): the learned placeholders (checked compatible).
    """

    def __init__(self, components: Components, subjects: Sequence[LearnedSubject]):
        from ..diffusers import install

        self.components, self.subjects = components, list(subjects)
        self.kind = components.kind
        self.encoder = PromptEncoder(components.tokenizers, components.text_encoders, self.kind)
        self.num_vectors = {s.placeholder: s.num_vectors for s in self.subjects}
        self.num_train_timesteps = int(components.scheduler.config.num_train_timesteps)
        self.vae_scale = 2 ** (len(components.vae.config.block_out_channels) - 1)
        self.controller = install(components.unet)

    def close(self) -> None:
        """Give the UNet its previous attention processors back."""
        self.controller.uninstall()

    def layouts(self, prompts: Sequence[str]) -> List[List[PromptLayout]]:
        """Per prompt, per encoder layouts (raises :class:`SefiInputError` for too-long prompts)."""
        return [self.encoder.layout(p, self.num_vectors) for p in prompts]

    def stages(self, timestep) -> Dict[str, int]:
        """Each placeholder's stage at ``timestep``."""
        return {s.placeholder: int(stage_of(float(timestep), s.num_stages, self.num_train_timesteps))
                for s in self.subjects}

    def text_states(self, layouts: Sequence[Sequence[PromptLayout]], stages: Dict[str, int],
                    pairs: Optional[Dict[str, List[Tensor]]] = None) -> Tuple[TextStates, TextStates]:
        r"""Key and value states of the prompts with each placeholder at its stage.

        Args:
            layouts: per prompt, per encoder (from :meth:`layouts`).
            stages (`Dict[str, int]`): placeholder → stage.
            pairs (`Dict[str, List[Tensor]]`, *optional*): placeholder → per-encoder [S, 2, n, d]
                (defaults to the subjects' learned pairs).

        Returns:
            ``(keys, values)`` :class:`TextStates`, ``hidden`` [P, 77, D] each.
        """
        pairs = pairs or {s.placeholder: s.pairs for s in self.subjects}
        chosen = {ph: fixed_pairs(pairs[ph], torch.tensor([stage])) for ph, stage in stages.items()}
        return self.encoder.encode_key_value(layouts, chosen)  # one pair per placeholder for all prompts

    def empty_states(self, batch: int) -> TextStates:
        """The unconditional states: the empty prompt, or zeros for SDXL's force-zeros rule."""
        if self.kind == "sdxl" and self.components.force_zeros_for_empty_prompt:
            ref = self.encoder.encode([self.encoder.layout("", {})])
            return TextStates(torch.zeros_like(ref.hidden).expand(batch, -1, -1),
                              torch.zeros_like(ref.pooled).expand(batch, -1))
        empty = self.encoder.encode([self.encoder.layout("", {})])
        return TextStates(empty.hidden.expand(batch, -1, -1),
                          None if empty.pooled is None else empty.pooled.expand(batch, -1))

    def map_layers(self, latent_side: int) -> Tuple[List[str], List[int]]:
        """Cross-attention layers whose grid side is 1/2 or 1/4 of the latent side, and those sides."""
        from ..diffusers.layers import grid_size, layer_levels

        levels = layer_levels(self.components.unet, self.controller.layers)
        sides = {n: grid_size(latent_side, latent_side, lv) for n, lv in levels.items()}
        wanted = [s for s in ((latent_side + 1) // 2, (latent_side + 3) // 4)]
        names = [n for n, g in sides.items() if g is not None and g[0] in wanted]
        found = sorted({sides[n][0] for n in names}, reverse=True)
        if not names:  # a tiny latent: fall back to the largest grids there are
            found = sorted({g[0] for g in sides.values() if g is not None}, reverse=True)[:2]
            names = [n for n, g in sides.items() if g is not None and g[0] in found]
        return names, found

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seed: int, *, steps: int = GenerateConfig.steps,
               resolution: Optional[int] = None, guidance_scale: float = GenerateConfig.guidance_scale,
               with_maps: bool = False, progress: bool = True,
               pairs: Optional[Dict[str, List[Tensor]]] = None) -> List[GeneratedImage]:
        r"""Generate one image per prompt from ``seed`` (prompt ``i`` uses seed ``seed`` as well).

        Args:
            prompts (`Sequence[str]`): prompts with placeholders.
            seed (`int`): seed of the initial latents (one generator per prompt, all from ``seed``).
            steps (`int`): denoising steps.
            resolution (`int`, *optional*): image side; defaults to the UNet's native size.
            guidance_scale (`float`): classifier-free guidance (≤ 1 disables the unconditional half).
            with_maps (`bool`): also aggregate per-token attention maps.
            progress (`bool`): tqdm bar over the steps.
            pairs (*optional*): override the learned pairs (see :meth:`text_states`).

        Returns:
            `List[GeneratedImage]` in prompt order.
        """
        from tqdm.auto import tqdm

        comps = self.components
        unet, scheduler = comps.unet, comps.scheduler
        device, dtype = unet.device, unet.dtype
        res = int(resolution or unet.config.sample_size * self.vae_scale)
        side = res // self.vae_scale
        layouts = self.layouts(prompts)
        n = len(prompts)
        cfg = guidance_scale > 1.0
        uncond = self.empty_states(n) if cfg else None

        shape = (1, unet.config.in_channels, side, side)
        latents = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)))
                             for _ in range(n)]).to(device, dtype)
        scheduler.set_timesteps(steps, device=device)
        step_kwargs = {}
        if "generator" in inspect.signature(scheduler.step).parameters:  # stochastic samplers
            step_kwargs["generator"] = torch.Generator(device).manual_seed(int(seed) + 1)
        latents = latents * scheduler.init_noise_sigma
        time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=dtype, device=device).expand(
            (2 if cfg else 1) * n, -1)

        ends = [lay[0].eos_index for lay in layouts]
        map_tokens = list(range(max(ends) + 1))
        map_names, map_sides = self.map_layers(side) if with_maps else ([], [])
        map_sum = None
        cache: Dict[Tuple, Tuple[TextStates, TextStates]] = {}
        for t in tqdm(scheduler.timesteps, disable=not progress, desc="semfid-generate", leave=False):
            stages = self.stages(t)
            key = tuple(sorted(stages.items()))
            if key not in cache:
                cache[key] = self.text_states(layouts, stages, pairs)
            keys, values = cache[key]
            k_states, v_states, pooled = keys.hidden, values.hidden, keys.pooled
            if cfg:
                k_states = torch.cat([uncond.hidden, k_states])
                v_states = torch.cat([uncond.hidden, v_states])
                pooled = None if pooled is None else torch.cat([uncond.pooled, pooled])
            model_in = torch.cat([latents] * 2) if cfg else latents
            model_in = scheduler.scale_model_input(model_in, t)
            added = None
            if self.kind == "sdxl":  # pooled embeds from the K-prompt, as in training
                added = {"text_embeds": pooled.to(dtype), "time_ids": time_ids}
            with self.controller.values(v_states.to(dtype)):
                if with_maps:
                    with self.controller.capture(map_tokens, head_reduce="mean", layers=map_names) as rec:
                        pred = unet(model_in, t, encoder_hidden_states=k_states.to(dtype),
                                    added_cond_kwargs=added).sample
                    step_maps = self._aggregate(rec, map_sides)[-n:]
                    map_sum = step_maps if map_sum is None else map_sum + step_maps
                else:
                    pred = unet(model_in, t, encoder_hidden_states=k_states.to(dtype),
                                added_cond_kwargs=added).sample
            if cfg:
                pred_uncond, pred_cond = pred.chunk(2)
                pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
            latents = scheduler.step(pred, t, latents, **step_kwargs).prev_sample

        if not bool(torch.isfinite(latents).all()):  # never a silently black image
            from .errors import SefiInputError

            raise SefiInputError(f"sampling seed {seed} produced non-finite latents (an overflow in the "
                                 f"model at --guidance-scale {guidance_scale:g}?); nothing was written")
        images = self._decode(latents)
        out = []
        for i, prompt in enumerate(prompts):
            item = GeneratedImage(prompt, i, int(seed), images[i])
            if map_sum is not None:
                keep = [j for j in range(1, ends[i])]  # prompt tokens: start and end excluded
                item.labels = [layouts[i][0].labels[j] for j in keep]
                item.maps = (map_sum[i, keep] / len(scheduler.timesteps)).float().cpu()
            out.append(item)
        return out

    @staticmethod
    def _aggregate(rec, sides: Sequence[int]) -> Tensor:
        """Mean of the recorder's maps at ``sides``, upsampled to the largest: [B, S, h, h]."""
        import torch.nn.functional as F

        big = max(sides)
        parts = []
        for s in sides:
            m = rec.aggregate(res=s)
            parts.append(F.interpolate(m, size=(big, big), mode="bilinear", align_corners=False)
                         if s != big else m)
        return torch.stack(parts).mean(0)

    def _decode(self, latents: Tensor) -> list:
        from PIL import Image

        vae = self.components.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor
        pixels = vae.decode(latents).sample
        pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]


__all__ = ["SefiSampler", "GeneratedImage"]
