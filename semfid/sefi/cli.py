"""Command-line entry points: ``semfid-train``, ``semfid-generate``, ``semfid-tiny-pipeline``.

Each ``*_main(argv=None)`` parses ``argv`` (default: ``sys.argv[1:]``) and returns the exit status:
0 on success, 2 for bad input (one ``prog: error: ...`` line on stderr, nothing written). They are
the console scripts declared in ``pyproject.toml``; ``python -m semfid.sefi.cli {train,generate,
tiny-pipeline} ...`` runs the same, which is also how ``accelerate launch -m semfid.sefi.cli train ...``
starts a multi-GPU run (``accelerate launch --no_python semfid-train ...`` works too).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

from .io import SefiInputError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never reach for a hub


def _quiet_libraries() -> None:
    """Keep stderr for our progress bar and errors: no per-file loading bars or info chatter."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="semfid-train",
        description="Learn a SeFi-IDE subject (per-stage K/V token pairs) from one or a few images with a "
                    "local SD1.5 or SDXL diffusers pipeline.",
    )
    p.add_argument("--model", required=True, help="diffusers pipeline folder (SD1.5 or SDXL)")
    p.add_argument("--image", required=True, action="append", help="subject image (repeat for several)")
    p.add_argument("--output", required=True, help="folder for the learned tokens and checkpoints")
    p.add_argument("--steps", type=int, default=500, help="optimisation steps (default 500)")
    p.add_argument("--resolution", type=int, default=None, help="crop side in px (default: native 512 / 1024)")
    p.add_argument("--placeholder", default="<v*>", help="the new token (default <v*>)")
    p.add_argument("--class-word", default="person", help="subject class of the reference prompt (default person)")
    p.add_argument("--initializer", default=None, help="word whose embedding initialises the tokens "
                                                         "(default: the class word)")
    p.add_argument("--template", default="a photo of the face of {}",
                   help="training prompt, {} = placeholder / class word (default 'a photo of the face of {}')")
    p.add_argument("--stages", type=int, default=5, help="timestep stages S (default 5)")
    p.add_argument("--num-vectors", type=int, default=1, help="vectors per P^K / P^V (default 1)")
    p.add_argument("--mode", choices=("attention", "direct"), default="attention",
                   help="token module: self-attention generator (default) or free vectors")
    p.add_argument("--attn-loss-weight", type=float, default=0.003, help="λ of the subject loss (default 0.003)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 1e-4 attention, 5e-3 direct)")
    p.add_argument("--batch-size", type=int, default=1, help="crops per step and process (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None,
                   help="default: fp16 on a GPU, no on CPU")
    p.add_argument("--gradient-checkpointing", action="store_true", help="checkpoint the UNet blocks")
    p.add_argument("--checkpoint-every", type=int, default=100, help="resumable checkpoint every N steps (0: never)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the newest checkpoint in --output (or the given checkpoint folder)")
    p.add_argument("--variant", default=None, help="weight variant of the pipeline folder, e.g. fp16")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    """``semfid-train``; returns the exit status."""
    args = _train_parser().parse_args(argv)
    _quiet_libraries()
    from .train import train

    try:
        result = train(
            args.model, args.image, args.output, resume=args.resume, progress=not args.quiet,
            steps=args.steps, resolution=args.resolution, placeholder=args.placeholder,
            class_word=args.class_word, initializer=args.initializer, template=args.template,
            stages=args.stages, num_vectors=args.num_vectors, mode=args.mode,
            attn_loss_weight=args.attn_loss_weight, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
            mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
            checkpoint_every=args.checkpoint_every, variant=args.variant,
        )
    except SefiInputError as exc:
        return _fail("semfid-train", str(exc))
    if result.mse:
        print(f"semfid-train: wrote {result.output} (last mse {result.mse[-1]:.4f}, "
              f"attn {result.subject[-1]:.3e})")
    else:
        print(f"semfid-train: wrote {result.output}")
    return 0


def _generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="semfid-generate",
        description="Generate images of SeFi-IDE subjects (several placeholders per prompt allowed).",
    )
    p.add_argument("--model", required=True, help="diffusers pipeline folder (SD1.5 or SDXL)")
    p.add_argument("--embeddings", required=True, action="append",
                   help="semfid-train output folder (repeat for several subjects)")
    p.add_argument("--prompt", required=True, action="append", help="prompt with placeholder(s) (repeatable)")
    p.add_argument("--output", required=True,
                   help="image file (.png/.jpg/.webp) or folder; several images get -PP-sSEED suffixes")
    p.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    p.add_argument("--resolution", type=int, default=None, help="image side (default: native 512 / 1024)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (default 7.5)")
    p.add_argument("--seed", type=int, action="append", default=None, help="seed (repeatable; default 0)")
    p.add_argument("--attention-maps", default=None, help="folder for per-token heatmap PNGs")
    p.add_argument("--variant", default=None, help="weight variant of the pipeline folder, e.g. fp16")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def generate_main(argv: Optional[Sequence[str]] = None) -> int:
    """``semfid-generate``; returns the exit status."""
    args = _generate_parser().parse_args(argv)
    _quiet_libraries()
    from .generate import generate

    try:
        results = generate(
            args.model, args.embeddings, args.prompt, output=args.output, steps=args.steps,
            resolution=args.resolution, guidance_scale=args.guidance_scale, seeds=args.seed or [0],
            attention_maps=args.attention_maps, variant=args.variant, progress=not args.quiet,
        )
    except SefiInputError as exc:
        return _fail("semfid-generate", str(exc))
    for r in results:
        print(f"semfid-generate: {r.path}  ({r.prompt!r}, seed {r.seed})")
    if args.attention_maps:
        print(f"semfid-generate: heatmaps in {args.attention_maps}")
    return 0


def _tiny_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="semfid-tiny-pipeline",
        description="Write a tiny random SD1.5 / SDXL diffusers pipeline (for tests and trying the CLIs).",
    )
    p.add_argument("kind", choices=("sd15", "sdxl"))
    p.add_argument("directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon")
    return p


def tiny_pipeline_main(argv: Optional[Sequence[str]] = None) -> int:
    """``semfid-tiny-pipeline``; returns the exit status."""
    args = _tiny_parser().parse_args(argv)
    _quiet_libraries()
    from .tiny import build_tiny_pipeline

    if os.path.exists(args.directory) and os.listdir(args.directory):
        return _fail("semfid-tiny-pipeline", f"{args.directory} exists and is not empty")
    build_tiny_pipeline(args.kind, args.directory, seed=args.seed, prediction_type=args.prediction_type)
    print(f"semfid-tiny-pipeline: wrote a tiny {args.kind} pipeline to {args.directory}")
    return 0


_COMMANDS = {"train": train_main, "generate": generate_main, "tiny-pipeline": tiny_pipeline_main}


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m semfid.sefi.cli {train,generate,tiny-pipeline} ...``"""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in _COMMANDS:
        print(f"usage: python -m semfid.sefi.cli {{{','.join(_COMMANDS)}}} ...", file=sys.stderr)
        return 2
    return _COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
