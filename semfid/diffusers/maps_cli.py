"""``semfid-maps``: per-word attention heatmaps of any local SD1.5 / SDXL / SD3 / Flux / PixArt-Σ pipeline.

::

    semfid-maps --model DIR --prompt "a cat wearing a hat" --tokens "cat,hat" --output maps/

loads the diffusers folder ``DIR`` (nothing is downloaded), installs semfid on its UNet / transformer,
generates one image (the pipeline's own progress bar shows the steps) while capturing the maps of
every layer whose keys include the text, and writes ``maps/image.png`` and, per step range
(``--step-ranges 0-10,10-28``; default all steps), ``maps/steps-A-B.png``: one labelled grid with the
image and one overlay per word. A word's map is the mean of its token positions (SD3: its CLIP and
its T5 positions), of the conditional row under classifier-free guidance, of every captured layer
(layers of a UNet's smaller grids upsampled to the largest one).

Only the selected columns are ever computed (DESIGN.md §9): the memory of a capture is the
[B, N_img, S] maps of each layer, never the [B, H, N, M] attention matrix.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .alignment import align_joint_tokens, align_tokens
from .controller import install
from .heatmaps import heatmap_grid


def _fail(message: str, status: int = 2) -> int:
    print(f"semfid-maps: error: {' '.join(message.split())}", file=sys.stderr)
    return status


def word_positions(pipe, prompt: str, word: str, max_sequence_length: int) -> Tuple[int, ...]:
    r"""Positions of ``word``'s tokens in the ``encoder_hidden_states`` ``pipe`` builds for ``prompt``.

    SD1.5 / SDXL: the CLIP positions (77); Flux: T5 (``tokenizer_2``); PixArt: T5 (``tokenizer``);
    SD3: the CLIP positions, then 77 + the T5 positions (``tokenizer_3``).
    """
    kind = type(pipe).__name__
    if hasattr(pipe, "tokenizer_3"):  # SD3: CLIP-L ⊕ CLIP-G (77), then T5
        aligned = align_joint_tokens([([pipe.tokenizer, pipe.tokenizer_2], pipe.tokenizer_max_length),
                                      (pipe.tokenizer_3, max_sequence_length)],
                                     prompt, word, word, which="subject")
    elif kind.startswith("Flux"):
        aligned = align_tokens(pipe.tokenizer_2, prompt, word, word, which="subject",
                               max_length=max_sequence_length)
    elif kind.startswith("PixArt"):
        aligned = align_tokens(pipe.tokenizer, prompt, word, word, which="subject",
                               max_length=max_sequence_length)
    else:
        toks = [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t is not None]
        aligned = align_tokens(toks, prompt, word, word, which="subject")
    return aligned.tokens[0]


def _step_ranges(spec: Optional[str], steps: int) -> List[Tuple[int, int]]:
    if not spec:
        return [(0, steps)]
    out = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        try:
            lo, hi = int(a), int(b)
        except ValueError:
            raise ValueError(f"--step-ranges must look like '0-10,10-28', got {spec!r}") from None
        if not 0 <= lo < hi <= steps:
            raise ValueError(f"--step-ranges: {part!r} must satisfy 0 <= A < B <= --steps ({steps})")
        out.append((lo, hi))
    return out


def word_heat(rec, columns: Sequence[Sequence[int]], steps: Sequence[int], row: int) -> torch.Tensor:
    """[W, h, w]: per word, the mean over ``steps``, layers and its ``columns`` of row ``row``."""
    grids = rec.resolutions
    size = grids[0]
    total = 0
    for step in steps:
        for res in grids:
            heat = rec.aggregate(res, step=step)[row]  # [S, h, w]
            if tuple(res) != tuple(size):
                heat = F.interpolate(heat[None], size=size, mode="bilinear", align_corners=False)[0]
            total = total + heat * sum(1 for g in rec.grids.values() if g == res)
    total = total / (len(steps) * len(rec.grids))
    return torch.stack([total[list(c)].mean(dim=0) for c in columns])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="semfid-maps", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="local diffusers pipeline folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--tokens", required=True, help="comma-separated words of the prompt, e.g. 'cat,hat'")
    p.add_argument("--output", required=True, help="folder for image.png and the heatmap grids")
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--step-ranges", default=None, help="e.g. '0-10,10-20': one grid per range")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--max-sequence-length", type=int, default=None, help="T5 length (SD3 / Flux / PixArt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``semfid-maps``; returns the exit status."""
    args = _parser().parse_args(argv)
    import diffusers

    if not os.path.isdir(args.model):
        return _fail(f"--model {args.model!r} is not a folder (a local diffusers pipeline is needed)")
    words = [w.strip() for w in args.tokens.split(",") if w.strip()]
    if not words:
        return _fail("--tokens must name at least one word of the prompt")
    try:
        steps = _step_ranges(args.step_ranges, args.steps)
    except ValueError as exc:
        return _fail(str(exc))
    pipe = diffusers.DiffusionPipeline.from_pretrained(args.model).to(args.device)
    model = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if model is None:
        return _fail(f"{type(pipe).__name__} has neither a unet nor a transformer")
    call = dict(prompt=args.prompt, num_inference_steps=args.steps,
                generator=torch.Generator(args.device).manual_seed(args.seed))
    for key in ("height", "width", "guidance_scale", "max_sequence_length"):
        if getattr(args, key) is not None:
            call[key] = getattr(args, key)
    if type(pipe).__name__.startswith("PixArt"):
        call["use_resolution_binning"] = False  # keep the size asked for
    name = type(pipe).__name__  # the pipelines' default T5 lengths
    length = args.max_sequence_length or (512 if name.startswith("Flux") else 300 if name.startswith("PixArt") else 256)
    try:
        columns, flat = [], []
        for w in words:
            pos = word_positions(pipe, args.prompt, w, length)
            columns.append(list(range(len(flat), len(flat) + len(pos))))
            flat.extend(pos)
    except ValueError as exc:
        return _fail(f"--tokens: {exc}")
    ctl = install(model)
    with ctl.capture(flat, accumulate="list") as rec:
        image = pipe(**call).images[0]
    ctl.uninstall()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    image.save(out / "image.png")
    row = rec.steps[0][next(iter(rec.steps[0]))].shape[0] - 1  # the conditional row under CFG
    for lo, hi in steps:
        heat = word_heat(rec, columns, range(lo, hi), row)
        heatmap_grid(heat, words, image=image).save(out / f"steps-{lo}-{hi}.png")
    print(f"semfid-maps: wrote {out / 'image.png'} and {len(steps)} heatmap grid(s) to {out}")
    return 0


__all__ = ["main", "word_positions", "word_heat"]
