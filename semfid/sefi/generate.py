"""SeFi-IDE generation: sample with learned stage token pairs, optionally with per-token heatmaps.

At every denoising step each placeholder of a prompt takes the (P^K, P^V) pair of the current
timestep's stage (its own S); the prompt is encoded twice through the frozen text encoder(s), once with
the P^K vectors (the key states, ``encoder_hidden_states``) and once with the P^V vectors (the value
states, routed to ``to_v`` only by :meth:`semfid.diffusers.SemfidController.values`). Under
classifier-free guidance the unconditional half keeps the pipeline's normal empty-prompt states (SDXL:
zeros when the folder sets ``force_zeros_for_empty_prompt``) for both keys and values.

Attention heatmaps: the head-averaged cross-attention maps of the conditional half, averaged over the
denoising steps and over the layers at 1/4 and 1/2 of the latent side (16×16 and 32×32 for SD1.5 at
512 px; 32×32 and 64×64 for SDXL at 1024 px, which has no 16×16 cross-attention), one PNG per prompt
token, overlaid on the image and labelled.
"""

from __future__ import annotations

import inspect
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import io
from .io import LearnedSubject, SefiInputError
from .text import PromptEncoder, PromptLayout, TextStates, placeholder_pattern
from .tokens import fixed_pairs, stage_of

Tensor = torch.Tensor
PathLike = Union[str, os.PathLike]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


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


# ------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------
def check_subjects(subjects: Sequence[LearnedSubject], dims: dict) -> None:
    r"""Raise :class:`SefiInputError` if subjects collide or do not fit the pipeline.

    Args:
        subjects (`Sequence[LearnedSubject]`): the loaded embeddings.
        dims (`dict`): :func:`~semfid.sefi.io.model_dims` of the pipeline; without ``token_widths``
            only the model kind is compared.
    """
    seen: Dict[str, str] = {}
    for s in subjects:
        for other, source in seen.items():
            if s.placeholder == other or s.placeholder in other or other in s.placeholder:
                raise SefiInputError(
                    f"placeholders collide: {s.placeholder!r} ({s.source}) and {other!r} ({source}); "
                    "train each subject with its own --placeholder"
                )
        seen[s.placeholder] = s.source
    for s in subjects:
        if s.kind != dims["kind"]:
            raise SefiInputError(f"embeddings {s.source} were trained on a {s.kind} model, the pipeline is "
                                 f"{dims['kind']}")
        if "token_widths" not in dims:
            continue
        if s.token_widths != dims["token_widths"] or s.cross_attention_dim != dims["cross_attention_dim"]:
            raise SefiInputError(
                f"embeddings {s.source} have token width(s) {s.token_widths} for cross-attention width "
                f"{s.cross_attention_dim}; the pipeline has {dims['token_widths']} / "
                f"{dims['cross_attention_dim']}: trained on another model"
            )


def check_prompts(prompts: Sequence[str], placeholders: Sequence[str]) -> None:
    """Every prompt must hold at least one of the placeholders."""
    if not prompts:
        raise SefiInputError("give at least one --prompt")
    pattern = placeholder_pattern(placeholders)
    for i, prompt in enumerate(prompts):
        if pattern is None or not pattern.search(prompt):
            raise SefiInputError(f"prompt {i + 1} ({prompt!r}) contains none of the placeholders "
                                 f"{', '.join(placeholders)}")


# ------------------------------------------------------------------------------------------------
# output naming and heatmap drawing
# ------------------------------------------------------------------------------------------------
def image_paths(output: PathLike, num_prompts: int, seeds: Sequence[int]) -> Dict[Tuple[int, int], Path]:
    r"""Where each (prompt index, seed) image goes.

    ``output`` with an image suffix (``.png``, ``.jpg``, ``.webp``) is the file itself for one prompt and
    one seed, else the stem of ``{stem}-{prompt:02d}-s{seed}{suffix}``; any other ``output`` is a folder
    of ``{prompt:02d}-s{seed}.png``.
    """
    output = Path(output)
    single = num_prompts == 1 and len(seeds) == 1
    if output.suffix.lower() in IMAGE_SUFFIXES:
        if single:
            return {(0, seeds[0]): output}
        return {(i, s): output.with_name(f"{output.stem}-{i:02d}-s{s}{output.suffix}")
                for i in range(num_prompts) for s in seeds}
    return {(i, s): output / f"{i:02d}-s{s}.png" for i in range(num_prompts) for s in seeds}


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


# ------------------------------------------------------------------------------------------------
# the sampler
# ------------------------------------------------------------------------------------------------
class SefiSampler:
    r"""Classifier-free-guided sampling with per-stage K/V token pairs of one or more subjects.

    Args:
        components (:class:`~semfid.sefi.io.Components`): the loaded pipeline parts.
        subjects (`Sequence[LearnedSubject]`): the learned placeholders (checked compatible).
    """

    def __init__(self, components: io.Components, subjects: Sequence[LearnedSubject]):
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
        key_fill, value_fill = {}, {}
        for ph, stage in stages.items():
            chosen = fixed_pairs(pairs[ph], torch.tensor([stage]))
            key_fill[ph] = [k[0] for k, _ in chosen]
            value_fill[ph] = [v[0] for _, v in chosen]
        n = len(layouts)
        both = self.encoder.encode(list(layouts) * 2, [key_fill] * n + [value_fill] * n)
        pooled = both.pooled
        return (TextStates(both.hidden[:n], None if pooled is None else pooled[:n]),
                TextStates(both.hidden[n:], None if pooled is None else pooled[n:]))

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
    def sample(self, prompts: Sequence[str], seed: int, *, steps: int = 30, resolution: Optional[int] = None,
               guidance_scale: float = 7.5, with_maps: bool = False, progress: bool = True,
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
        unet, vae, scheduler = comps.unet, comps.vae, comps.scheduler
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


# ------------------------------------------------------------------------------------------------
# the entry point
# ------------------------------------------------------------------------------------------------
def generate(model: PathLike, embeddings: Sequence[PathLike], prompts: Sequence[str], *,
             output: Optional[PathLike] = None, steps: int = 30, resolution: Optional[int] = None,
             guidance_scale: float = 7.5, seeds: Sequence[int] = (0,), attention_maps: Optional[PathLike] = None,
             device: Optional[Union[str, torch.device]] = None, dtype: Optional[torch.dtype] = None,
             variant: Optional[str] = None, progress: bool = True) -> List[GeneratedImage]:
    r"""Generate images of learned subjects with a local SD1.5 / SDXL diffusers pipeline.

    Args:
        model (`str` or `os.PathLike`): the diffusers pipeline folder (SD1.5 or SDXL, detected).
        embeddings (`Sequence[str or os.PathLike]`): ``semfid-train`` output folders, one per subject,
            with distinct placeholders.
        prompts (`Sequence[str]`): each holds one or more placeholders.
        output (`str` or `os.PathLike`, *optional*): image file or folder (see :func:`image_paths`);
            nothing is written when omitted.
        steps (`int`, *optional*, defaults to 30): denoising steps (the folder's scheduler).
        resolution (`int`, *optional*): image side (default: 512 SD1.5, 1024 SDXL).
        guidance_scale (`float`, *optional*, defaults to 7.5).
        seeds (`Sequence[int]`, *optional*, defaults to ``(0,)``): one image per prompt and seed.
        attention_maps (`str` or `os.PathLike`, *optional*): folder for per-token heatmaps,
            ``{prompt:02d}-s{seed}/{position:02d}-{token}.png``.
        device (*optional*): defaults to CUDA when available.
        dtype (`torch.dtype`, *optional*): model dtype (default float16 on CUDA, float32 on CPU).
        variant (`str`, *optional*): weight variant of the folder (``"fp16"``).
        progress (`bool`, *optional*, defaults to True): progress bars.

    Returns:
        `List[GeneratedImage]` (prompt-major, then seed), with ``path`` set when written.

    Raises:
        SefiInputError: bad input, detected before anything is written.
    """
    prompts = list(prompts)
    seeds = list(dict.fromkeys(int(s) for s in seeds))  # one image per distinct seed
    if not embeddings:
        raise SefiInputError("give at least one --embeddings folder")
    if not seeds:
        raise SefiInputError("give at least one seed")
    if steps < 1:
        raise SefiInputError(f"--steps must be >= 1, got {steps}")
    if resolution is not None and (resolution < 8 or resolution % 8):
        raise SefiInputError(f"--resolution must be a positive multiple of 8, got {resolution}")
    subjects = [io.load_learned(e) for e in embeddings]
    placeholders = [s.placeholder for s in subjects]
    check_subjects(subjects, {"kind": io.detect_kind(model)})  # widths once the model is loaded
    check_prompts(prompts, placeholders)
    if output is not None:
        out = Path(output)
        if out.suffix.lower() in IMAGE_SUFFIXES and not out.parent.is_dir():
            raise SefiInputError(f"--output folder {out.parent} does not exist")
        if out.suffix.lower() not in IMAGE_SUFFIXES and out.exists() and not out.is_dir():
            raise SefiInputError(f"--output {out} exists and is not a folder")

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    components = io.load_components(model, device=device, dtype=dtype, variant=variant)
    check_subjects(subjects, io.model_dims(components))
    sampler = SefiSampler(components, subjects)
    try:
        sampler.layouts(prompts)  # too-long prompts fail here, before any sampling
        results = []
        for seed in seeds:
            results += sampler.sample(prompts, seed, steps=steps, resolution=resolution,
                                      guidance_scale=guidance_scale, with_maps=attention_maps is not None,
                                      progress=progress)
    finally:
        sampler.close()
    results.sort(key=lambda r: (r.prompt_index, seeds.index(r.seed)))
    if output is not None:
        paths = image_paths(output, len(prompts), seeds)
        for r in results:
            r.path = paths[(r.prompt_index, r.seed)]
            r.path.parent.mkdir(parents=True, exist_ok=True)
            io.save_image(r.image, r.path)
    if attention_maps is not None:
        write_heatmaps(results, attention_maps)
    return results


def write_heatmaps(results: Sequence[GeneratedImage], folder: PathLike) -> List[Path]:
    """Write one labelled overlay PNG per prompt token of every result; returns the paths."""
    written = []
    for r in results:
        sub = Path(folder) / f"{r.prompt_index:02d}-s{r.seed}"
        sub.mkdir(parents=True, exist_ok=True)
        for j, (label, heat) in enumerate(zip(r.labels, r.maps)):
            path = sub / f"{j + 1:02d}-{_safe(label)}.png"
            written.append(io.save_image(heatmap_image(r.image, heat, label), path))
    return written


__all__ = ["generate", "SefiSampler", "GeneratedImage", "image_paths", "heatmap_image", "write_heatmaps",
           "check_subjects", "check_prompts"]
