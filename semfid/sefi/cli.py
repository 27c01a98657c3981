"""Command-line entry points: ``semfid-train``, ``semfid-generate``, ``semfid-tiny-pipeline``.

Each ``*_main(argv=None)`` parses ``argv`` (default: ``sys.argv[1:]``) and returns the exit status:
0 on success, 2 for bad input (one ``prog: error: ...`` line on stderr naming the option or file,
checked before any work, nothing written), 3 when training diverged (a non-finite loss or token value;
the message names the step, the checkpoints already written stay). They are
the console scripts declared in ``pyproject.toml``; ``python -m semfid.sefi.cli {train,generate,
tiny-pipeline} ...`` runs the same, which is also how ``accelerate launch -m semfid.sefi.cli train ...``
starts a multi-GPU run (``accelerate launch --no_python semfid-train ...`` works too).

The options of a run are the fields of :class:`~semfid.sefi.config.TrainConfig`,
:class:`~semfid.sefi.config.GenerateConfig` and :class:`~semfid.sefi.tiny.TinyPipelineConfig`: their
defaults and help texts are written there only (:mod:`semfid.sefi.options`). This module adds the
arguments that name files (``--model``, ``--image``, ``--output`` ...) and ``--quiet``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

from .config import GenerateConfig, TrainConfig
from .errors import SefiDivergedError, SefiInputError
from .options import add_options, given_options

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never reach for a hub

_MODEL_HELP = "diffusers pipeline folder (SD1.5 or SDXL)"


def _quiet_libraries() -> None:
    """Keep stderr for our progress bar and errors: no per-file loading bars or info chatter."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


def _fail(prog: str, message: str, status: int = 2) -> int:
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)  # one line
    return status


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="semfid-train",
        description="Learn a SeFi-IDE subject (per-stage K/V token pairs) from one or a few images with a "
                    "local SD1.5 or SDXL diffusers pipeline.",
    )
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--image", required=True, action="append", help="subject image (repeat for several)")
    p.add_argument("--output", required=True, help="folder for the learned tokens and checkpoints")
    add_options(p, TrainConfig)
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the newest checkpoint in --output (or the given checkpoint folder)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    """``semfid-train``; returns the exit status."""
    args = _train_parser().parse_args(argv)
    _quiet_libraries()
    from .train import train

    try:
        result = train(args.model, args.image, args.output, resume=args.resume, progress=not args.quiet,
                       **given_options(args, TrainConfig))
    except SefiInputError as exc:
        return _fail("semfid-train", str(exc), 3 if isinstance(exc, SefiDivergedError) else 2)
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
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--embeddings", required=True, action="append",
                   help="semfid-train output folder (repeat for several subjects)")
    p.add_argument("--prompt", required=True, action="append", help="prompt with placeholder(s) (repeatable)")
    p.add_argument("--output", required=True,
                   help="image file (.png/.jpg/.webp) or folder; several images get -PP-sSEED suffixes")
    add_options(p, GenerateConfig)
    p.add_argument("--attention-maps", default=None, help="folder for per-token heatmap PNGs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def generate_main(argv: Optional[Sequence[str]] = None) -> int:
    """``semfid-generate``; returns the exit status."""
    args = _generate_parser().parse_args(argv)
    _quiet_libraries()
    from .generate import generate

    try:
        results = generate(args.model, args.embeddings, args.prompt, output=args.output,
                           attention_maps=args.attention_maps, progress=not args.quiet,
                           **given_options(args, GenerateConfig))
    except SefiInputError as exc:
        return _fail("semfid-generate", str(exc))
    for r in results:
        print(f"semfid-generate: {r.path}  ({r.prompt!r}, seed {r.seed})")
    if args.attention_maps:
        print(f"semfid-generate: heatmaps in {args.attention_maps}")
    return 0


def _tiny_parser() -> argparse.ArgumentParser:
    from ..testing.tiny_dit import DIT_KINDS
    from .tiny import KINDS, TinyPipelineConfig

    p = argparse.ArgumentParser(
        prog="semfid-tiny-pipeline",
        description="Write a tiny random SD1.5 / SDXL / SD3.5 / Flux / PixArt-Σ diffusers pipeline (for "
                    "tests and trying the CLIs; DiTs: semfid.testing.tiny_dit, --seed only).",
    )
    p.add_argument("kind", choices=KINDS + DIT_KINDS)
    p.add_argument("directory")
    add_options(p, TinyPipelineConfig)
    return p


def tiny_pipeline_main(argv: Optional[Sequence[str]] = None) -> int:
    """``semfid-tiny-pipeline``; returns the exit status."""
    from ..testing.tiny_dit import DIT_KINDS, build_tiny_dit_pipeline
    from .tiny import TinyPipelineConfig, build_tiny_pipeline

    args = _tiny_parser().parse_args(argv)
    _quiet_libraries()
    if os.path.exists(args.directory) and os.listdir(args.directory):
        return _fail("semfid-tiny-pipeline", f"{args.directory} exists and is not empty")
    options = given_options(args, TinyPipelineConfig)
    if args.kind in DIT_KINDS:
        build_tiny_dit_pipeline(args.kind, args.directory, seed=options.get("seed", 0))
    else:
        build_tiny_pipeline(args.kind, args.directory, **options)
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
