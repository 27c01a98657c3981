"""align_tokens with a T5 tokenizer (Flux, PixArt) and align_joint_tokens for SD3's CLIP-L + CLIP-G + T5
text states, on tokenizers built locally (nothing downloaded)."""

from __future__ import annotations

import pytest
from transformers import CLIPTokenizer, T5TokenizerFast

from semfid.diffusers.alignment import align_joint_tokens, align_tokens
from semfid.sefi.tiny import write_tiny_tokenizer
from semfid.testing.tiny_dit import write_tiny_t5_tokenizer


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    t5 = T5TokenizerFast.from_pretrained(write_tiny_t5_tokenizer(root / "t5"))
    clip = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(root / "clip"))
    clip2 = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(root / "clip2", pad_token="!"))
    return t5, clip, clip2


def _where(tokenizer, prompt, pieces):
    ids = list(tokenizer(prompt).input_ids)
    return [i for i in range(len(ids)) if ids[i: i + len(pieces)] == pieces][0]


def test_t5_positions_have_no_start_token(tokenizers):
    t5, _, _ = tokenizers
    prompts = ["a photo of sks dog", "sks sitting on a chair"]
    aligned = align_tokens(t5, prompts, "sks", "cat", which="subject", max_length=32)
    sks = t5("sks", add_special_tokens=False).input_ids  # several pieces: paired with "cat" each
    for row, prompt in enumerate(prompts):
        start = _where(t5, prompt, sks)
        assert aligned.tokens[row] == tuple(range(start, start + len(sks)))
        ref_ids = list(t5(aligned.ref_prompts[row]).input_ids)
        assert {ref_ids[j] for j in aligned.ref_tokens[row]} == set(t5("cat", add_special_tokens=False).input_ids)
    every = align_tokens(t5, prompts[:1], "sks", "cat", max_length=32)
    ids = t5(prompts[0]).input_ids
    assert every.tokens[0] == tuple(range(len(ids)))  # first piece at 0, </s> last
    assert every.labels[0][-1] == "</s>"
    cut = align_tokens(t5, prompts[:1], "sks", "cat", max_length=4)  # truncated: </s> at 3
    assert cut.tokens[0] == (0, 1, 2, 3) and cut.labels[0][-1] == "</s>"


def test_sd3_positions_in_clip_then_t5_states(tokenizers):
    t5, clip, clip2 = tokenizers
    prompt = "a photo of sks dog"
    aligned = align_joint_tokens([([clip, clip2], 77), (t5, 32)], prompt, "sks", None, which="all")
    clip_only = align_tokens([clip, clip2], prompt, "sks", None)
    t5_only = align_tokens(t5, prompt, "sks", None, max_length=32)
    assert aligned.tokens[0] == clip_only.tokens[0] + tuple(77 + t for t in t5_only.tokens[0])
    assert aligned.ref_tokens[0] == clip_only.ref_tokens[0] + tuple(77 + t for t in t5_only.ref_tokens[0])
    assert aligned.labels[0] == clip_only.labels[0] + t5_only.labels[0]
    assert aligned.ref_prompts == ("a photo of dog",)
    with pytest.raises(ValueError, match=r"segments\[1\] must be a \(tokenizers, length > 0\) pair"):
        align_joint_tokens([([clip], 77), (t5, 0)], prompt, "sks", None)
