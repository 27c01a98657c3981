"""Local stand-ins for the tiny hub repos diffusers' fast SD / SDXL / LoRA tests download.

Writes a huggingface_hub cache under $HF_HOME (offline use, HF_HUB_OFFLINE=1):
  hf-internal-testing/tiny-random-clip   CLIP tokenizer (semfid.sefi.tiny's) + tiny CLIPTextModel
  peft-internal-testing/tiny-clip-text-2 same tokenizer + CLIPTextModelWithProjection (hidden 32, proj 32)
  hf-internal-testing/tiny-random-t5     T5 tokenizer (semfid.testing.tiny_dit's) + T5 config (d_model 32):
                                         the SD3 / Flux / PixArt pipeline tests build T5EncoderModel(config)
Random weights (seed 0): the tests' hard-coded output slices cannot match; both runs use this cache.
"""
import os

import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from semfid.sefi.tiny import write_tiny_tokenizer


def _snapshot(root: str, repo: str) -> str:
    """Create ``repo``'s snapshot folder (commit 00..0, refs/main) in the hub cache under ``root``."""
    commit = "0" * 40
    base = os.path.join(root, "hub", "models--" + repo.replace("/", "--"))
    snap = os.path.join(base, "snapshots", commit)
    os.makedirs(snap, exist_ok=True)
    os.makedirs(os.path.join(base, "refs"), exist_ok=True)
    with open(os.path.join(base, "refs", "main"), "w") as f:
        f.write(commit)
    return snap


def write_repo(root: str, repo: str, with_model: bool) -> None:
    """One repo's snapshot (commit 00..0, refs/main) with the tokenizer and, if asked, the text encoder."""
    snap = _snapshot(root, repo)
    write_tiny_tokenizer(snap)  # semfid's byte-level CLIP BPE tokenizer (77 tokens, ids < 1000)
    if with_model:
        torch.manual_seed(0)
        cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37,
                             layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5,
                             pad_token_id=1, vocab_size=1000, projection_dim=32, hidden_act="gelu")
        CLIPTextModelWithProjection(cfg).save_pretrained(snap)
    print("wrote", repo, sorted(os.listdir(snap)))


def write_t5_repo(root: str, repo: str) -> None:
    """A T5 repo's snapshot: semfid's T5-style tokenizer and a T5 config as tiny as the hub's (d_model 32)."""
    from transformers import T5Config

    from semfid.testing.tiny_dit import write_tiny_t5_tokenizer

    snap = _snapshot(root, repo)
    write_tiny_t5_tokenizer(snap)
    T5Config(vocab_size=1103, d_model=32, d_kv=8, d_ff=37, num_layers=5, num_heads=4, relative_attention_num_buckets=8,
             pad_token_id=0, eos_token_id=1, decoder_start_token_id=0).save_pretrained(snap)
    print("wrote", repo, sorted(os.listdir(snap)))


if __name__ == "__main__":
    root = os.environ["HF_HOME"]
    write_repo(root, "hf-internal-testing/tiny-random-clip", True)
    write_repo(root, "peft-internal-testing/tiny-clip-text-2", True)
    write_t5_repo(root, "hf-internal-testing/tiny-random-t5")
