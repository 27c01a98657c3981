"""Local stand-ins for the tiny hub repos diffusers' fast SD / SDXL / LoRA tests download.

Writes a huggingface_hub cache under $HF_HOME (offline use, HF_HUB_OFFLINE=1):
  hf-internal-testing/tiny-random-clip   CLIP tokenizer (semfid.sefi.tiny's) + tiny CLIPTextModel
  peft-internal-testing/tiny-clip-text-2 same tokenizer + CLIPTextModelWithProjection (hidden 32, proj 32)
Random weights (seed 0): the tests' hard-coded output slices cannot match; both runs use this cache.
"""
import os

import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from semfid.sefi.tiny import write_tiny_tokenizer


def write_repo(root: str, repo: str, with_model: bool) -> None:
    """One repo's snapshot (commit 00..0, refs/main) with the tokenizer and, if asked, the text encoder."""
    commit = "0" * 40
    base = os.path.join(root, "hub", "models--" + repo.replace("/", "--"))
    snap = os.path.join(base, "snapshots", commit)
    os.makedirs(snap, exist_ok=True)
    os.makedirs(os.path.join(base, "refs"), exist_ok=True)
    with open(os.path.join(base, "refs", "main"), "w") as f:
        f.write(commit)
    write_tiny_tokenizer(snap)  # semfid's byte-level CLIP BPE tokenizer (77 tokens, ids < 1000)
    if with_model:
        torch.manual_seed(0)
        cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37,
                             layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5,
                             pad_token_id=1, vocab_size=1000, projection_dim=32, hidden_act="gelu")
        CLIPTextModelWithProjection(cfg).save_pretrained(snap)
    print("wrote", repo, sorted(os.listdir(snap)))


if __name__ == "__main__":
    root = os.environ["HF_HOME"]
    write_repo(root, "hf-internal-testing/tiny-random-clip", True)
    write_repo(root, "peft-internal-testing/tiny-clip-text-2", True)
