"""Tiny random SD1.5 / SDXL pipelines that load offline, for tests and for trying the CLIs anywhere.

``semfid-tiny-pipeline {sd15,sdxl} DIR`` writes a diffusers folder whose UNet is the structural twin of
the real one (same block layout and cross-attention layer names: 16 ``attn2`` layers for SD1.5, 70 for
SDXL, tiny widths), with a tiny VAE, tiny CLIP text encoder(s), a working CLIP BPE tokenizer over a
small word list and the real model's scheduler settings. The weights are random: images are noise,
but every code path of training and generation runs exactly as on the real model.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

import torch

from ..testing.unets import load_unet_config
from .options import document, option

#: Words that become single tokens of the tiny tokenizer (every other word still tokenizes, by
#: characters).
TINY_WORDS = (
    "a an and at beach cat chair dog face hands hat in man of on painting park person photo portrait "
    "red shaking sitting style the wearing with woman"
).split()

_START, _END = "<|startoftext|>", "<|endoftext|>"
_MAX_LENGTH = 77
KINDS = ("sd15", "sdxl")
PREDICTION_TYPES = ("epsilon", "v_prediction")
#: the tiny pipelines' default resolution is 64 px: latents 8x8 with the 8x VAE
_SAMPLE_SIZE = 8


@document
@dataclass
class TinyPipelineConfig:
    r"""The options of ``semfid-tiny-pipeline`` besides the kind and the folder."""

    seed: int = option(0, "seed of the random weights")
    prediction_type: str = option("epsilon", "scheduler prediction type", choices=PREDICTION_TYPES)


def _byte_symbols() -> list:
    """The 256 printable symbols byte-level BPE uses for the bytes 0..255, in byte order.

    Printable Latin-1 bytes stand for themselves; the others are shifted to code points from 256 up,
    so every byte has a visible, whitespace-free symbol (the convention CLIP's vocabulary follows).
    """
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    symbols, shifted = [], 0
    for byte in range(256):
        if byte in keep:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + shifted))
            shifted += 1
    return symbols


def _bpe(word: str, ranks: dict) -> list:
    """Byte-pair merge ``word`` (ASCII) with ``ranks``, lowest rank first, as CLIP's tokenizer does."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


def write_tiny_tokenizer(directory: Union[str, os.PathLike], words: Iterable[str] = TINY_WORDS,
                         pad_token: str = _END) -> Path:
    r"""Write a working CLIP BPE tokenizer (``vocab.json``, ``merges.txt``, config) to ``directory``.

    The vocabulary holds every byte symbol alone and as a word end (``x</w>``), the merges that build
    each of ``words`` left to right, then ``<|startoftext|>`` and ``<|endoftext|>`` (the largest id,
    as in CLIP, so that legacy ``eos_token_id = 2`` pooling by ``argmax`` also finds it).

    Args:
        directory (`str` or `os.PathLike`): folder to write (created if needed).
        words (`Iterable[str]`, *optional*): lowercase words that become single tokens.
        pad_token (`str`, *optional*, defaults to ``"<|endoftext|>"``): SD1.5 pads with the end token,
            SDXL's second tokenizer with ``"!"``.

    Returns:
        `Path`: ``directory``; ``CLIPTokenizer.from_pretrained(directory)`` loads it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    ranks: dict = {}  # (left, right) -> merge priority
    for word in sorted(set(w.lower() for w in words)):
        # apply the merges so far; when the word is not one token yet, append a merge for its first
        # two parts. Appended merges rank below every earlier one, so earlier words stay whole.
        while len(parts := _bpe(word, ranks)) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
            vocab.setdefault(parts[0] + parts[1], len(vocab))
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    vocab[_START] = len(vocab)
    vocab[_END] = len(vocab)
    with open(directory / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(directory / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": _MAX_LENGTH,
        "bos_token": _START,
        "eos_token": _END,
        "unk_token": _END,
        "pad_token": pad_token,
    }
    with open(directory / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return directory


def _text_config(vocab_size: int, hidden: int, pad_id: int, eos_id: int, bos_id: int,
                 projection_dim: Optional[int] = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=_MAX_LENGTH, hidden_act="quick_gelu",
        projection_dim=projection_dim or hidden, pad_token_id=pad_id, bos_token_id=bos_id,
        eos_token_id=eos_id,
    )


def build_tiny_pipeline(kind: str, directory: Union[str, os.PathLike], *, seed: int = TinyPipelineConfig.seed,
                        prediction_type: str = TinyPipelineConfig.prediction_type) -> Path:
    r"""Build and save a tiny random SD1.5 or SDXL pipeline that ``from_pretrained`` loads offline.

    Args:
        kind (`str`): ``"sd15"`` or ``"sdxl"``.
        directory (`str` or `os.PathLike`): output folder (a diffusers pipeline folder; created).
        seed (`int`, *optional*): seed of the random weights (see :class:`TinyPipelineConfig`).
        prediction_type (`str`, *optional*): scheduler prediction type, one of :data:`PREDICTION_TYPES`.

    Returns:
        `Path`: ``directory``. SD1.5: UNet twin with ``cross_attention_dim`` 32 and one 32-wide text
        encoder. SDXL: UNet twin with ``cross_attention_dim`` 64 = two 32-wide text encoders, pooled
        ``text_embeds`` of width 32 and 6 time ids of width 8 (80 = ``projection_class_embeddings_input_dim``).
        Both at 64 px by default (latents 8x8).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler,
                           StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    directory = Path(directory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with tempfile.TemporaryDirectory() as scratch:
            tok_dir = write_tiny_tokenizer(Path(scratch) / "tokenizer")
            tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
            tokenizer_2 = None
            if kind == "sdxl":
                tok2_dir = write_tiny_tokenizer(Path(scratch) / "tokenizer_2", pad_token="!")
                tokenizer_2 = CLIPTokenizer.from_pretrained(tok2_dir)
        ids = dict(vocab_size=len(tokenizer), eos_id=tokenizer.eos_token_id, bos_id=tokenizer.bos_token_id)
        unet_config = dict(load_unet_config(f"{kind}_unet_twin"), sample_size=_SAMPLE_SIZE)
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=64,
            scaling_factor=0.18215 if kind == "sd15" else 0.13025, force_upcast=(kind == "sdxl"),
        )
        scheduler_kwargs = dict(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            steps_offset=1, prediction_type=prediction_type,
        )
        if kind == "sd15":
            text_encoder = CLIPTextModel(_text_config(pad_id=tokenizer.pad_token_id, hidden=32, **ids))
            scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **scheduler_kwargs)
            pipe = StableDiffusionPipeline(
                vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
        else:
            text_encoder = CLIPTextModel(_text_config(pad_id=tokenizer.pad_token_id, hidden=32, **ids))
            text_encoder_2 = CLIPTextModelWithProjection(
                _text_config(pad_id=tokenizer_2.pad_token_id, hidden=32, projection_dim=32, **ids)
            )
            scheduler = EulerDiscreteScheduler(timestep_spacing="leading", **scheduler_kwargs)
            pipe = StableDiffusionXLPipeline(
                vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False,
            )
        pipe.save_pretrained(directory, safe_serialization=True)
    return directory


__all__ = ["build_tiny_pipeline", "write_tiny_tokenizer", "TinyPipelineConfig", "TINY_WORDS", "KINDS", "PREDICTION_TYPES"]
