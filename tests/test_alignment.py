"""Token alignment (semfid.diffusers.align_tokens) on locally built CLIP tokenizers."""

from __future__ import annotations

import pytest
from transformers import CLIPTokenizer

from semfid.diffusers import AlignedTokens, align_tokens
from semfid.sefi.tiny import TINY_WORDS, write_tiny_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return CLIPTokenizer.from_pretrained(write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def tok_bang(tmp_path_factory):
    """SDXL's second tokenizer pads with "!" instead of end-of-text; the split is the same."""
    return CLIPTokenizer.from_pretrained(write_tiny_tokenizer(tmp_path_factory.mktemp("tok2"), pad_token="!"))


def ids(tok, text):
    return tok(text).input_ids  # with start / end tokens, no padding


def check_pairs(tok, aligned, placeholder, class_word):
    """Every pair names the same token in both prompts, or the placeholder against the class word."""
    ph = tok(placeholder, add_special_tokens=False).input_ids
    cls = tok(class_word, add_special_tokens=False).input_ids if class_word else []
    for p, rp, t, r in zip(aligned.prompts, aligned.ref_prompts, aligned.tokens, aligned.ref_tokens):
        a, b = ids(tok, p), ids(tok, rp)
        assert len(t) == len(r)
        for i, j in zip(t, r):
            assert a[i] == b[j] or (a[i] in ph and b[j] in cls), (p, rp, i, j)


def test_sks_is_several_pieces(tok):
    assert len(tok("sks", add_special_tokens=False).input_ids) == 3
    assert len(tok("dog", add_special_tokens=False).input_ids) == 1


@pytest.mark.parametrize("class_word", ["dog", "person", None])
def test_all_tokens_cover_start_to_end(tok, class_word):
    prompts = ["a photo of sks", "a red sks dog sitting on a chair in the park"]
    al = align_tokens(tok, prompts, "sks", class_word)
    assert isinstance(al, AlignedTokens) and al.which == "all" and len(al) == 2
    check_pairs(tok, al, "sks", class_word)
    for p, rp, t, r in zip(al.prompts, al.ref_prompts, al.tokens, al.ref_tokens):
        n_t, n_r = len(ids(tok, p)), len(ids(tok, rp))
        assert t[0] == r[0] == 0 and t[-1] == n_t - 1 and r[-1] == n_r - 1  # start / end of text
        ph = set(range(p.split().index("sks") + 1, p.split().index("sks") + 4))
        if class_word is None:  # dropped identifier: every other token once, each side
            assert sorted(t) == [i for i in range(n_t) if i not in ph] and sorted(r) == list(range(n_r))
        else:  # 3 placeholder pieces against 1 class token: every pair
            assert set(t) == set(range(n_t)) and set(r) == set(range(n_r))
    assert al.ref_prompts[1] == ("a red dog sitting on a chair in the park" if class_word is None
                                 else f"a red {class_word} dog sitting on a chair in the park")
    assert len(al.tokens[0]) != len(al.tokens[1])  # ragged rows


def test_issue_example_dropped_identifier(tok):
    al = align_tokens(tok, "a photo of sks dog", "sks", None)
    # start, a, photo, of | 3 pieces of sks dropped | dog, end  against  "a photo of dog"
    assert al.tokens == ((0, 1, 2, 3, 7, 8),) and al.ref_tokens == ((0, 1, 2, 3, 4, 5),)
    assert al.labels[0][1] == "a</w>" and al.labels[0][4] == "dog</w>"


def test_subject_only_and_several_placeholders(tok):
    al = align_tokens(tok, ["sks and a sks dog", "a photo of sks"], "sks", "cat", which="subject")
    check_pairs(tok, al, "sks", "cat")
    cat = tok("cat", add_special_tokens=False).input_ids[0]
    assert len(al.tokens[0]) == 6 and len(al.tokens[1]) == 3  # two placeholders x 3 pieces; one
    for rp, r in zip(al.ref_prompts, al.ref_tokens):
        assert {ids(tok, rp)[j] for j in r} == {cat}
    equal = align_tokens(tok, "a photo of sks", "sks", "s k s", which="subject")  # 3 vs 3: one to one
    assert equal.tokens == ((4, 5, 6),) and equal.ref_tokens == ((4, 5, 6),)


def test_padding_does_not_move_positions(tok):
    al = align_tokens(tok, "a cat sitting on a chair with sks", "sks", "dog")
    padded = tok(al.prompts[0], padding="max_length", max_length=77).input_ids
    plain = ids(tok, al.prompts[0])
    assert [padded[i] for i in al.tokens[0]] == [plain[i] for i in al.tokens[0]]


def test_truncation_at_77(tok):
    long = " ".join(["a red cat"] * 30) + " sks"  # 90 words: the placeholder is cut off
    with pytest.raises(ValueError, match="beyond the 77-token limit"):
        align_tokens(tok, long, "sks", "dog", which="subject")
    al = align_tokens(tok, ["sks " + long.replace(" sks", ""), long], "sks", "dog")
    for t, r in zip(al.tokens, al.ref_tokens):
        assert max(t) == t[-1] == 76 and max(r) == r[-1] == 76  # end of text where truncation puts it
    # row 0: 3 placeholder pieces against 1 class token, so the class position appears 3 times
    assert len(set(al.ref_tokens[0])) == len(al.ref_tokens[0]) - 2 and len(set(al.tokens[0])) == 77
    truncated = tok(long, truncation=True, max_length=77).input_ids
    assert [truncated[i] for i in al.tokens[1][:-1]] == ids(tok, long)[:76]


def test_sdxl_tokenizers_must_agree(tok, tok_bang, tmp_path):
    prompts = ["a photo of sks", "sks wearing a hat"]
    both = align_tokens([tok, tok_bang], prompts, "sks", "man")
    assert both == align_tokens(tok, prompts, "sks", "man")
    other = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(tmp_path, words=list(TINY_WORDS) + ["sks"]))
    with pytest.raises(ValueError, match=r"tokenizers\[0\] and tokenizers\[1\] split prompts\[0\]"):
        align_tokens([tok, other], prompts, "sks", "man")


def test_bad_input(tok):
    with pytest.raises(ValueError, match=r"prompts\[1\] does not contain the placeholder 'sks'"):
        align_tokens(tok, ["a sks", "a dog"], "sks", "dog")
    with pytest.raises(ValueError, match="must be a separate word"):
        align_tokens(tok, ["a photo of sksdog"], "sks", "cat")
    with pytest.raises(ValueError, match="which must be one of"):
        align_tokens(tok, ["a sks"], "sks", "dog", which="some")
    with pytest.raises(ValueError, match="class word is dropped"):
        align_tokens(tok, ["a sks"], "sks", None, which="subject")
    with pytest.raises(TypeError, match="prompts must be"):
        align_tokens(tok, [], "sks", "dog")


def test_decoded_prompts_and_prior_preservation_rows(tok, tmp_path):
    """Textual inversion recovers prompts with batch_decode (an added token glues to the next word);
    DreamBooth's prior-preservation class rows have no identifier and align with themselves."""
    ti = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(tmp_path))
    ti.add_tokens(["<cat-toy>"])
    ids_ = ti(["a photo of a <cat-toy>", "a <cat-toy> sitting on a red chair"], padding="max_length",
              max_length=77, return_tensors="pt").input_ids
    decoded = ti.batch_decode(ids_, skip_special_tokens=True)
    al = align_tokens(ti, decoded, "<cat-toy>", "cat")
    assert al.ref_prompts == ("a photo of a cat", "a cat sitting on a red chair")
    for row, t in zip(ids_.tolist(), al.tokens):
        assert list(t) == list(range(len(t))) and row[t[-1]] == ti.eos_token_id  # start ... end of text
    check_pairs(ti, al, "<cat-toy>", "cat")
    mixed = align_tokens(tok, ["a photo of sks dog", "a photo of dog"], "sks", None, allow_missing=True)
    assert mixed.ref_prompts[1] == "a photo of dog" and mixed.tokens[1] == mixed.ref_tokens[1] == (0, 1, 2, 3, 4, 5)
