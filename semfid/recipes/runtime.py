"""What a diffusers example script patched by ``semfid-recipe`` calls at run time.

The patch adds three options (:func:`add_semfid_arguments`), one :class:`SemfidRecipe` after the UNet
(or transformer) is ready, a ``with semfid.block(prompts, encode):`` around every model call of the
training loop and
``loss = semfid.add_loss(loss)`` just before ``accelerator.backward(loss)``, after the script's
prior-preservation and SNR-weighting branches. The lines themselves live in
:mod:`semfid.recipes.patches`.
"""

from __future__ import annotations

import argparse
import difflib
import logging
from contextlib import nullcontext
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ..diffusers import align_joint_tokens, align_tokens, install

logger = logging.getLogger(__name__)

#: the paper's weight of the subject-wise attention loss (SeFi-IDE, λ = 0.003)
DEFAULT_WEIGHT = 0.003


def add_semfid_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--semfid_weight``, ``--semfid_identifier`` and ``--semfid_class_word`` to ``parser``."""
    group = parser.add_argument_group("semfid subject-wise attention loss (SeFi-IDE)")
    group.add_argument("--semfid_weight", type=float, default=DEFAULT_WEIGHT,
                       help="weight of the subject loss added to the script's loss; 0 adds nothing and "
                            "leaves the run bit for bit as without the recipe (default %(default)s)")
    group.add_argument("--semfid_identifier", type=str, default=None,
                       help="the identifier in the prompts (default: --placeholder_token, or the words "
                            "of --instance_prompt that --class_prompt lacks)")
    group.add_argument("--semfid_class_word", type=str, default=None,
                       help="what stands in the identifier's place in the reference prompt (default: "
                            "--initializer_token, or what --class_prompt has there; nothing: dropped)")


def identifier_from_prompts(instance_prompt: str, class_prompt: Optional[str]) -> Tuple[str, Optional[str]]:
    """(identifier, class word) from a DreamBooth instance prompt and its class prompt.

    The one span of words where the prompts differ: ``"a photo of sks dog"`` / ``"a photo of dog"``
    → ``("sks", None)`` (the identifier is dropped in the reference); ``"a photo of sks"`` /
    ``"a photo of dog"`` → ``("sks", "dog")``. Either way the reference of the instance prompt is
    the class prompt.

    Raises:
        ValueError: there is no class prompt, or the prompts differ in more than one span.
    """
    if not class_prompt:
        raise ValueError(f"semfid: cannot tell the identifier in --instance_prompt {instance_prompt!r} "
                         "without --class_prompt; pass --semfid_identifier (and --semfid_class_word)")
    inst, cls = instance_prompt.split(), class_prompt.split()
    spans = [op for op in difflib.SequenceMatcher(a=inst, b=cls, autojunk=False).get_opcodes() if op[0] != "equal"]
    if len(spans) != 1 or spans[0][1] == spans[0][2]:
        raise ValueError(f"semfid: --instance_prompt {instance_prompt!r} and --class_prompt {class_prompt!r} "
                         "must differ in one span of words (the identifier); pass --semfid_identifier "
                         "(and --semfid_class_word)")
    _, i1, i2, j1, j2 = spans[0]
    return " ".join(inst[i1:i2]), (" ".join(cls[j1:j2]) or None)


class _LossBlock:
    """``with`` block around one model call: enters the controller's subject-loss block, keeps the recorder."""

    def __init__(self, recipe: "SemfidRecipe", block, rows: int):
        self._recipe, self._block, self._rows = recipe, block, rows

    def __enter__(self):
        rec = self._block.__enter__()
        self._recipe._pending = (rec, self._rows)
        return rec

    def __exit__(self, *exc):
        return self._block.__exit__(*exc)


class SemfidRecipe:
    r"""The subject-wise attention loss inside a diffusers example training script.

    Args:
        unet (`UNet2DConditionModel`, `FluxTransformer2DModel` or `SD3Transformer2DModel`): the
            script's denoiser (LoRA adapters added or not).
        args (`argparse.Namespace`): the script's parsed arguments, with the ``--semfid_*`` options.
        tokenizers: the tokenizer, or SDXL's two, that tokenize the training prompts (UNets).
        segments (`list[tuple]`, *optional*): instead of ``tokenizers``, the text states as
            ``(tokenizers, length)`` segments for :func:`~semfid.diffusers.align_joint_tokens`:
            Flux ``[(t5_tokenizer, max_sequence_length)]``, SD3 ``[([clip_l, clip_g], 77),
            (t5_tokenizer, max_sequence_length)]``.
        identifier (`str`, *optional*): the identifier as it appears in the batch's prompts; defaults
            to ``--semfid_identifier``, else derived from ``--instance_prompt`` / ``--class_prompt``.
        class_word (`str`, *optional*): what replaces it in the reference prompt; defaults to
            ``--semfid_class_word``, else derived with the identifier (``None``: dropped).

    Raises:
        ValueError: ``--pre_compute_text_embeddings`` is set (the batch then carries no prompts and
            there is no text encoder for the reference prompts), the weight is negative or not
            finite, or no identifier can be told.
    """

    def __init__(self, unet, args: argparse.Namespace, tokenizers=None, *, identifier: Optional[str] = None,
                 class_word: Optional[str] = None, segments: Optional[Sequence[Tuple[object, int]]] = None):
        if getattr(args, "pre_compute_text_embeddings", False):
            raise ValueError("semfid: --pre_compute_text_embeddings is not supported by the semfid recipe: the "
                             "batch then holds text states instead of token ids and the text encoder is "
                             "dropped, so the reference prompts cannot be encoded; run without that flag")
        weight = float(args.semfid_weight)
        if not (weight >= 0 and weight < float("inf")):
            raise ValueError(f"semfid: --semfid_weight must be a finite number >= 0, got {args.semfid_weight!r}")
        self.weight = weight
        if (tokenizers is None) == (segments is None):
            raise ValueError("semfid: give exactly one of tokenizers (UNet scripts) and segments (Flux / SD3 "
                             "text states as (tokenizers, length) pairs)")
        if args.semfid_identifier is not None:
            identifier, class_word = args.semfid_identifier, args.semfid_class_word
        elif identifier is None:
            identifier, class_word = identifier_from_prompts(args.instance_prompt, getattr(args, "class_prompt", None))
        if args.semfid_class_word is not None:
            class_word = args.semfid_class_word
        self.identifier, self.class_word = identifier, class_word
        self.tokenizers, self.segments = tokenizers, segments
        self.prior = bool(getattr(args, "with_prior_preservation", False))
        self.controller = install(unet)
        self._pending = None
        self.last_loss: Optional[torch.Tensor] = None

    def block(self, prompts: Sequence[str], encode: Callable[[List[str]], torch.Tensor]):
        r"""The ``with`` block for one model call (UNet or transformer) on a batch with these prompts.

        Args:
            prompts (`list[str]`): the batch's own prompts, one per row of the UNet call; with prior
                preservation the second half are the class prompts (allowed to lack the identifier,
                their rows are left out of the loss).
            encode (`callable`): reference prompts → text states ``[B, M, C]`` (or a tuple whose
                first item they are), encoded as the script encodes its own prompts.

        Returns:
            a context manager; with ``--semfid_weight 0`` one that does nothing (the prompts are still
            checked for the identifier).

        Raises:
            ValueError: the identifier appears in none of the prompts, or an instance row lacks it.
        """
        prompts = [str(p) for p in prompts]
        class_rows = len(prompts) // 2 if self.prior else 0
        rows = len(prompts) - class_rows
        missing = [i >= rows for i in range(len(prompts))]
        if self.segments is not None:
            aligned = align_joint_tokens(self.segments, prompts, self.identifier, self.class_word,
                                         allow_missing=missing)
        else:
            aligned = align_tokens(self.tokenizers, prompts, self.identifier, self.class_word, allow_missing=missing)
        self._pending = None
        if self.weight == 0:
            return nullcontext()
        with torch.no_grad():
            ref = encode(list(aligned.ref_prompts))
        ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).detach()
        return _LossBlock(self, self.controller.subject_loss(ref, aligned), rows)

    def add_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` plus the weighted subject loss of this step's model call (instance rows only)."""
        if self.weight == 0:
            return loss
        if self._pending is None:
            raise RuntimeError("semfid: no UNet call ran inside `with semfid.block(...)` this step: every "
                               "`model_pred = unet(...)` (or `= transformer(...)`) of the training loop must "
                               "be wrapped")
        rec, rows = self._pending
        self._pending = None
        subject = rec.loss[:rows].mean()
        self.last_loss = subject.detach()
        logger.info("semfid subject loss %.9g (weight %g)", float(self.last_loss), self.weight)
        return loss + self.weight * subject.to(loss.dtype)


__all__ = ["DEFAULT_WEIGHT", "SemfidRecipe", "add_semfid_arguments", "identifier_from_prompts"]
