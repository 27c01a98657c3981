"""``generate``: images of learned subjects from a local SD1.5 / SDXL pipeline, optionally with heatmaps.

Checks every input before anything is written (embeddings against each other, against the pipeline and
against the prompts), samples with :class:`~semfid.sefi.sample.SefiSampler` for each seed, then writes
the images (see :func:`image_paths`) and the heatmaps (:mod:`semfid.sefi.heatmaps`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import checks
from .config import GenerateConfig
from .errors import SefiInputError
from .files import PathLike
from .heatmaps import write_heatmaps
from .images import save_image
from .learned import LearnedSubject, load_learned
from .options import check_option_names
from .pipeline import detect_kind, load_components, load_tokenizers, model_dims
from .sample import GeneratedImage, SefiSampler
from .text import placeholder_pattern

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def check_subjects(subjects: Sequence[LearnedSubject], dims: dict) -> None:
    r"""Raise :class:`SefiInputError` if subjects collide or do not fit the pipeline.

    Args:
        subjects (`Sequence[LearnedSubject]`): the loaded embeddings.
        dims (`dict`): :func:`~semfid.sefi.pipeline.model_dims` of the pipeline; without ``token_widths``
            only the model kind is compared.
    """
    seen: Dict[str, str] = {}
    for s in subjects:
        if s.placeholder in seen:
            raise SefiInputError(f"placeholders collide: {s.placeholder!r} in {s.source} and in "
                                 f"{seen[s.placeholder]}; train each subject with its own --placeholder")
        seen[s.placeholder] = s.source
    checks.distinct_placeholders(seen)
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


def generate(model: PathLike, embeddings: Sequence[PathLike], prompts: Sequence[str], *,
             output: Optional[PathLike] = None, attention_maps: Optional[PathLike] = None,
             device: Optional[Union[str, torch.device]] = None, dtype: Optional[torch.dtype] = None,
             progress: bool = True, **options) -> List[GeneratedImage]:
    r"""Generate images of learned subjects with a local SD1.5 / SDXL diffusers pipeline.

    Args:
        model (`str` or `os.PathLike`): the diffusers pipeline folder (SD1.5 or SDXL, detected).
        embeddings (`Sequence[str or os.PathLike]`): ``semfid-train`` output folders, one per subject,
            with distinct placeholders.
        prompts (`Sequence[str]`): each holds one or more placeholders.
        output (`str` or `os.PathLike`, *optional*): image file or folder (see :func:`image_paths`);
            nothing is written when omitted.
        attention_maps (`str` or `os.PathLike`, *optional*): folder for per-token heatmaps,
            ``{prompt:02d}-s{seed}/{position:02d}-{token}.png``.
        device (*optional*): defaults to CUDA when available.
        dtype (`torch.dtype`, *optional*): model dtype (default float16 on CUDA, float32 on CPU).
        progress (`bool`, *optional*, defaults to True): progress bars.
        **options: fields of :class:`~semfid.sefi.config.GenerateConfig` (``steps``, ``resolution``,
            ``guidance_scale``, ``seeds``, ``variant``).

    Returns:
        `List[GeneratedImage]` (prompt-major, then seed), with ``path`` set when written.

    Raises:
        SefiInputError: bad input, detected before anything is written.
    """
    check_option_names(options, GenerateConfig, "generation")
    prompts = list(prompts)
    config = GenerateConfig(**options)
    if not embeddings:
        raise SefiInputError("give at least one --embeddings folder")
    config.validate()
    config.seeds = list(dict.fromkeys(config.seeds))  # one image per distinct seed
    seeds = config.seeds
    if output is not None:
        if Path(output).suffix.lower() in IMAGE_SUFFIXES:
            checks.writable_file("--output", output)
        else:
            checks.writable_folder("--output", output)
    if attention_maps is not None:
        checks.writable_folder("--attention-maps", attention_maps)
    subjects = [load_learned(e) for e in embeddings]
    placeholders = [s.placeholder for s in subjects]
    check_subjects(subjects, {"kind": detect_kind(model)})  # widths once the model is loaded
    check_prompts(prompts, placeholders)
    tokenizers = load_tokenizers(model)
    for s in subjects:
        checks.not_a_word(f"the placeholder of {s.source}", s.placeholder, tokenizers)

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    components = load_components(model, device=device, dtype=dtype, variant=config.variant)
    check_subjects(subjects, model_dims(components))
    num_train_timesteps = int(components.scheduler.config.num_train_timesteps)
    if config.steps > num_train_timesteps:
        raise SefiInputError(f"--steps {config.steps} exceeds the scheduler's num_train_timesteps "
                             f"({num_train_timesteps})")
    sampler = SefiSampler(components, subjects)
    try:
        sampler.layouts(prompts)  # too-long prompts fail here, before any sampling
        results = []
        for seed in seeds:
            results += sampler.sample(prompts, seed, steps=config.steps, resolution=config.resolution,
                                      guidance_scale=config.guidance_scale,
                                      with_maps=attention_maps is not None, progress=progress)
    finally:
        sampler.close()
    results.sort(key=lambda r: (r.prompt_index, seeds.index(r.seed)))
    if output is not None:
        paths = image_paths(output, len(prompts), seeds)
        for r in results:
            r.path = paths[(r.prompt_index, r.seed)]
            r.path.parent.mkdir(parents=True, exist_ok=True)
            save_image(r.image, r.path)
    if attention_maps is not None:
        write_heatmaps(results, attention_maps)
    return results


__all__ = ["generate", "image_paths", "check_subjects", "check_prompts", "IMAGE_SUFFIXES"]
