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


def _t5_encoder(tokenizer, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=2 * width,
                                   num_layers=2, num_heads=4, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0))


def _vae(latent_channels: int, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                         sample_size=64, **extra)


def build_tiny_dit_pipeline(kind: str, directory: Union[str, os.PathLike], *, seed: int = 0) -> Path:
    r"""Build and save a tiny random SD3.5-medium, Flux.1-dev or PixArt-Σ pipeline that loads offline.

    Args:
        kind (`str`): ``"sd3"``, ``"flux"`` or ``"pixart"``.
        directory (`str` or `os.PathLike`): output folder (created).
        seed (`int`, *optional*, defaults to 0): seed of the random weights.

    Returns:
        `Path`: ``directory``. The transformers are the twins of :mod:`semfid.testing.dits`
        (text width 32); CLIP encoders 16 wide with 16-wide projections (SD3: CLIP-L ⊕ CLIP-G = 32
        pooled; Flux: one 32-wide CLIP for the pooled projection), T5 encoders 32 wide, VAEs with
        4 latent channels and the 8x scale factor. Run them at 64 px (max_sequence_length 32).
    """
    if kind not in DIT_KINDS:
        raise ValueError(f"kind must be one of {DIT_KINDS}, got {kind!r}")
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5TokenizerFast

    names = {"sd3": "sd35_medium_transformer_twin", "flux": "flux_dev_transformer_twin",
             "pixart": "pixart_sigma_transformer_twin"}
    directory = Path(directory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with tempfile.TemporaryDirectory() as scratch:
            t5_tok = T5TokenizerFast.from_pretrained(write_tiny_t5_tokenizer(Path(scratch) / "t5"))
            clip_tok = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(Path(scratch) / "clip"))
            clip_tok2 = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(Path(scratch) / "clip2", pad_token="!"))
        config = load_dit_config(names[kind])
        transformer = getattr(diffusers, config.pop("_class_name")).from_config(config)
        ids = dict(vocab_size=len(clip_tok), pad_id=clip_tok.pad_token_id, eos_id=clip_tok.eos_token_id,
                   bos_id=clip_tok.bos_token_id)
        if kind == "sd3":
            pipe = diffusers.StableDiffusion3Pipeline(
                transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
                vae=_vae(4, shift_factor=0.0609, scaling_factor=1.5305),
                text_encoder=CLIPTextModelWithProjection(_text_config(hidden=16, projection_dim=16, **ids)),
                tokenizer=clip_tok,
                text_encoder_2=CLIPTextModelWithProjection(
                    _text_config(hidden=16, projection_dim=16, **dict(ids, pad_id=clip_tok2.pad_token_id))),
                tokenizer_2=clip_tok2, text_encoder_3=_t5_encoder(t5_tok, 32), tokenizer_3=t5_tok,
            )
        elif kind == "flux":
            pipe = diffusers.FluxPipeline(
                scheduler=diffusers.FlowMatchEulerDiscreteScheduler(
                    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                    base_image_seq_len=256, max_image_seq_len=4096),
                vae=_vae(4, shift_factor=0.1159, scaling_factor=0.3611),
                text_encoder=CLIPTextModel(_text_config(hidden=32, **ids)), tokenizer=clip_tok,
                text_encoder_2=_t5_encoder(t5_tok, 32), tokenizer_2=t5_tok, transformer=transformer,
            )
        else:
            pipe = diffusers.PixArtSigmaPipeline(
                tokenizer=t5_tok, text_encoder=_t5_encoder(t5_tok, 32), vae=_vae(4, scaling_factor=0.13025),
                transformer=transformer, scheduler=diffusers.DPMSolverMultistepScheduler(),
            )
        pipe.save_pretrained(directory, safe_serialization=True)
    return directory


__all__ = ["DIT_KINDS", "write_tiny_t5_tokenizer", "build_tiny_dit_pipeline"]
