"""Tiny random SD3, Flux and PixArt-Σ pipelines that load offline, for tests and for trying the CLIs.

``semfid-tiny-pipeline {sd3,flux,pixart} DIR`` writes a diffusers folder whose transformer is the
structural twin of the real one (:mod:`semfid.testing.dits`: same block layout and attention layer
names, tiny widths), with a tiny VAE, tiny text encoders, working tokenizers built here (CLIP BPE
over a small word list, :func:`semfid.sefi.tiny.write_tiny_tokenizer`; a T5-style SentencePiece
Unigram tokenizer, :func:`write_tiny_t5_tokenizer`) and the real model's scheduler kind. The weights
are random: images are noise, but every code path runs as on the real model.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Union

import torch

from ..sefi.tiny import TINY_WORDS, _text_config, write_tiny_tokenizer
from .dits import load_dit_config

DIT_KINDS = ("sd3", "flux", "pixart")
_T5_LENGTH = {"sd3": 32, "flux": 32, "pixart": 32}  # max_sequence_length of the tiny pipelines
_LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789,.!?'-<>"


def write_tiny_t5_tokenizer(directory: Union[str, os.PathLike], words: Iterable[str] = TINY_WORDS) -> Path:
    r"""Write a T5-style tokenizer (SentencePiece Unigram, ``▁`` word starts, no start token) to ``directory``.

    Every word of ``words`` is one piece ``▁word``; any other text falls back to ``▁`` + single
    characters. ``</s>`` ends a sequence, ``<pad>`` pads, as in T5.

    Returns:
        `Path`: ``directory``; ``T5TokenizerFast.from_pretrained(directory)`` loads it.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -4.0)]
    vocab += [("▁" + w, -1.0) for w in sorted(set(w.lower() for w in words))]
    vocab += [("▁" + c, -5.0) for c in _LETTERS] + [(c, -6.0) for c in _LETTERS]
    core = Tokenizer(models.Unigram(vocab, unk_id=2))
    core.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Strip()])
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer = T5TokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>",
                                unk_token="<unk>", extra_ids=0, model_max_length=512)
    directory = Path(directory)
    tokenizer.save_pretrained(directory)
    return directory


__all__ = ["DIT_KINDS", "write_tiny_t5_tokenizer"]
