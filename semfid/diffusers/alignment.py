"""Token alignment between target prompts with a placeholder and their reference prompts.

SeFi-IDE (and any "make V* attend like the class word" loss) compares the attention map of each
target-prompt token with the map of the *same word* in a reference prompt. With a multi-token
identifier ("sks" may be three BPE pieces) or a dropped identifier ("a sks dog" vs "a dog") the
positions no longer line up, and rows of a batch differ in length. :func:`align_tokens` works
the positions out from the tokenizer(s) once, for a whole batch::

    aligned = align_tokens(pipe.tokenizer, prompts, "<cat-toy>", "cat")   # SD1.5
    aligned = align_tokens([pipe.tokenizer, pipe.tokenizer_2], prompts, "sks", None)   # SDXL
    ref_states = encode(aligned.ref_prompts)
    with ctl.subject_loss(ref_states, aligned) as rec: ...

Positions count the start token as 0, as ``tokenizer(prompt).input_ids`` does; padding (after
end-of-text) and truncation at ``model_max_length`` (77) do not move them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

WHICH = ("all", "subject")
Rows = Tuple[Tuple[int, ...], ...]


@dataclass(frozen=True)
class AlignedTokens:
    r"""Aligned token positions of a batch; pass it as ``tokens`` to ``subject_loss`` / ``capture``.

    Attributes:
        prompts (`tuple[str]`): the target prompts, as given.
        ref_prompts (`tuple[str]`): the reference prompts (placeholder → class word, or dropped).
        tokens (`tuple[tuple[int]]`): per row, target positions (ragged: rows may differ in length).
        ref_tokens (`tuple[tuple[int]]`): per row, the paired reference positions, as many.
        labels (`tuple[tuple[str]]`): per row, the target token strings at ``tokens`` (heatmap labels).
        which (`str`): ``"all"`` (every real token, start to end-of-text) or ``"subject"``.
    """

    prompts: Tuple[str, ...]
    ref_prompts: Tuple[str, ...]
    tokens: Rows
    ref_tokens: Rows
    labels: Tuple[Tuple[str, ...], ...]
    which: str

    def __len__(self) -> int:
        return len(self.prompts)


def _pieces(tokenizer, text: str) -> List[int]:
    # stripped: SentencePiece (T5) turns a trailing space into a piece of its own; CLIP ignores it
    return list(tokenizer(text.strip(), add_special_tokens=False).input_ids) if text.strip() else []


def _has_bos(tokenizer) -> bool:
    """Whether the tokenizer starts a sequence with a start token (CLIP: yes, T5: no)."""
    bos = tokenizer.bos_token_id
    return bos is not None and list(tokenizer("a").input_ids[:1]) == [bos]


def _pair(ph: Sequence[int], cls: Sequence[int]) -> List[Tuple[int, int]]:
    """Offsets (placeholder piece, class piece) paired: one to one when the counts agree, else
    every placeholder piece with every class piece; none when the class word is dropped."""
    if not cls:
        return []
    if len(ph) == len(cls):
        return list(zip(range(len(ph)), range(len(cls))))
    return [(i, j) for i in range(len(ph)) for j in range(len(cls))]


def _align_one(tokenizer, prompt: str, placeholder: str, class_word: Optional[str], which: str,
               limit: int, row: int, allow_missing: bool):
    """(ref_prompt, tokens, ref_tokens, labels) of one prompt under one tokenizer."""
    parts = prompt.split(placeholder)
    if len(parts) < 2 and not allow_missing:
        raise ValueError(f"prompts[{row}] does not contain the placeholder {placeholder!r}: {prompt!r} "
                         "(allow_missing aligns rows meant to lack it, such as prior-preservation class "
                         "prompts, with themselves)")
    ph = _pieces(tokenizer, placeholder)
    cls = _pieces(tokenizer, class_word) if class_word else []
    # spaces around the class word: decoded prompts may glue an added token to the next word
    ref_prompt = " ".join(f" {class_word} ".join(parts).split()) if class_word else " ".join(" ".join(parts).split())
    seg = [_pieces(tokenizer, p) for p in parts]
    target_ids = [i for j, s in enumerate(seg) for i in (s + (ph if j < len(seg) - 1 else []))]
    ref_ids = [i for j, s in enumerate(seg) for i in (s + (cls if j < len(seg) - 1 else []))]
    for what, text, ids in (("prompts", prompt, target_ids), ("reference prompt", ref_prompt, ref_ids)):
        if _pieces(tokenizer, text) != ids:
            raise ValueError(
                f"{what}[{row}] {text!r}: the placeholder {placeholder!r} must be a separate word "
                "(spaces or punctuation around it), so that it tokenizes the same inside the prompt"
            )
    lead = 1 if _has_bos(tokenizer) else 0
    everything: List[Tuple[int, int]] = [(0, 0)] if lead else []  # start of text
    subject: List[Tuple[int, int]] = []
    t = r = lead
    for j, s in enumerate(seg):
        everything += [(t + i, r + i) for i in range(len(s))]
        t, r = t + len(s), r + len(s)
        if j < len(seg) - 1:
            pairs = [(t + a, r + b) for a, b in _pair(ph, cls)]
            everything += pairs
            subject += pairs
            t, r = t + len(ph), r + len(cls)
    last = limit - 1  # end-of-text sits at min(length, limit - 1) after truncation
    keep = [(a, b) for a, b in (everything if which == "all" else subject) if a < last and b < last]
    if which == "all":
        keep.append((min(t, last), min(r, last)))
    if not keep:
        why = ("the class word is dropped (class_word=None): use which='all'" if not cls
               else f"the placeholder lies beyond the {limit}-token limit")
        raise ValueError(f"prompts[{row}] {prompt!r}: no subject tokens to align; {why}")
    full = [tokenizer.bos_token_id] * lead + target_ids[: last - lead] + [tokenizer.eos_token_id]
    labels = tuple(tokenizer.convert_ids_to_tokens(full[a]) for a, _ in keep)
    return ref_prompt, tuple(a for a, _ in keep), tuple(b for _, b in keep), labels


def _missing_flags(allow_missing, rows: int) -> List[bool]:
    """``allow_missing`` as one flag per prompt."""
    if isinstance(allow_missing, bool):
        return [allow_missing] * rows
    flags = list(allow_missing) if isinstance(allow_missing, (list, tuple)) else None
    if flags is None or len(flags) != rows or not all(isinstance(f, bool) for f in flags):
        raise ValueError(f"allow_missing must be a bool or one bool per prompt ({rows}), got {allow_missing!r}")
    return flags


def align_tokens(tokenizers, prompts: Union[str, Sequence[str]], placeholder: str,
                 class_word: Optional[str], *, which: str = "all",
                 max_length: Optional[int] = None,
                 allow_missing: Union[bool, Sequence[bool]] = False) -> AlignedTokens:
    r"""Reference prompts and aligned ``tokens`` / ``ref_tokens`` for a batch of target prompts.

    Args:
        tokenizers: the pipeline's CLIP tokenizer (SD1.5), or both of SDXL's (``[tokenizer,
            tokenizer_2]``), which must split every prompt alike.
        prompts (`str` or `list[str]`): target prompts, each with ``placeholder`` at least once.
        placeholder (`str`): the learned token or identifier (``"<cat-toy>"``, ``"sks"``; any
            number of BPE pieces), a separate word in the prompt.
        class_word (`str` or `None`): what stands in its place in the reference prompt
            (``"cat"``, ``"teddy bear"``); ``None`` drops it (DreamBooth: "a sks dog" → "a dog").
        which (`str`, *optional*, defaults to ``"all"``): ``"all"`` pairs every real token from
            start to end-of-text (the placeholder's pieces with the class word's: one to one when
            the counts agree, else every pair; a dropped identifier is left out); ``"subject"``
            only the placeholder / class-word pairs.
        max_length (`int`, *optional*): defaults to the tokenizer's ``model_max_length`` (77);
            tokens cut off by truncation are left out, end-of-text is paired where it ends up.
        allow_missing (`bool` or `list[bool]`, *optional*, defaults to False): which rows may lack
            the placeholder (``True``: every row; a list: one flag per prompt). Give it only for rows
            meant to lack it (DreamBooth prior-preservation class prompts): such a row becomes its
            own reference, every token paired with itself, so its loss is 0 (``which="all"``).
            A placeholder found in none of the prompts is an error whatever ``allow_missing`` says
            (a mistyped identifier would otherwise give a loss of 0 on every row).

    Returns:
        :class:`AlignedTokens`

    Raises:
        ValueError: no prompt holds the placeholder, a prompt not allowed to lack it lacks it, it is
            not a separate word, ``which`` is unknown, nothing is left to align, ``allow_missing``
            has not one flag per prompt, or two tokenizers disagree.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a string or a non-empty list of strings")
    if not isinstance(placeholder, str) or not placeholder.strip():
        raise ValueError(f"placeholder must be a non-empty string, got {placeholder!r}")
    if class_word is not None and not isinstance(class_word, str):
        raise TypeError(f"class_word must be a string or None, got {type(class_word).__name__}")
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    missing_ok = _missing_flags(allow_missing, len(prompts))
    if not any(placeholder in p for p in prompts):
        raise ValueError(f"the placeholder {placeholder!r} appears in none of the {len(prompts)} prompts "
                         f"{list(prompts)!r}: check the identifier (its loss would be 0 on every row)")
    toks = list(tokenizers) if isinstance(tokenizers, (list, tuple)) else [tokenizers]
    if not toks:
        raise ValueError("tokenizers must hold at least one tokenizer")
    results = []
    for tok in toks:
        limit = max_length or int(tok.model_max_length)
        rows = [_align_one(tok, p, placeholder, class_word, which, limit, i, missing_ok[i])
                for i, p in enumerate(prompts)]
        results.append(rows)
    first = [(r[1], r[2]) for r in results[0]]
    for k, rows in enumerate(results[1:], start=1):
        if [(r[1], r[2]) for r in rows] != first:
            row = next(i for i, r in enumerate(rows) if (r[1], r[2]) != first[i])
            raise ValueError(
                f"tokenizers[0] and tokenizers[{k}] split prompts[{row}] {prompts[row]!r} differently "
                "(positions would not line up in the concatenated text states)"
            )
    rows = results[0]
    return AlignedTokens(tuple(prompts), tuple(r[0] for r in rows), tuple(r[1] for r in rows),
                         tuple(r[2] for r in rows), tuple(r[3] for r in rows), which)


def align_joint_tokens(segments: Sequence[Tuple[object, int]], prompts: Union[str, Sequence[str]],
                       placeholder: str, class_word: Optional[str], *, which: str = "all",
                       allow_missing: Union[bool, Sequence[bool]] = False) -> AlignedTokens:
    r"""Aligned positions in text states made of several token sequences one after another.

    SD3's ``encoder_hidden_states`` are the CLIP-L ⊕ CLIP-G states (77 positions, the two
    tokenizers side by side along the width, as in SDXL) followed by the T5 states (256 by
    default): a word lands on one position in the first 77 and on one in the next 256. This aligns
    each segment with :func:`align_tokens` (at its own length) and concatenates the positions,
    each moved by the lengths of the segments before it::

        aligned = align_joint_tokens([([pipe.tokenizer, pipe.tokenizer_2], 77), (pipe.tokenizer_3, 256)],
                                     prompts, "sks", "dog")

    (Flux's text states are T5 alone, PixArt's too: ``align_tokens(t5_tokenizer, ...,
    max_length=512 / 300)``.)

    Args:
        segments: ``(tokenizers, length)`` per segment in key order; ``tokenizers`` as
            :func:`align_tokens` takes them, ``length`` the segment's token count (the pipeline's
            ``max_length`` / ``max_sequence_length``).
        prompts, placeholder, class_word, which, allow_missing: as in :func:`align_tokens`.

    Returns:
        :class:`AlignedTokens` whose positions index the concatenated sequence.
    """
    if not isinstance(segments, (list, tuple)) or not segments:
        raise ValueError("segments must be a non-empty list of (tokenizers, length) pairs")
    parts, offset = [], 0
    for i, seg in enumerate(segments):
        if not (isinstance(seg, (list, tuple)) and len(seg) == 2 and isinstance(seg[1], int) and seg[1] > 0):
            raise ValueError(f"segments[{i}] must be a (tokenizers, length > 0) pair, got {seg!r}")
        aligned = align_tokens(seg[0], prompts, placeholder, class_word, which=which, max_length=seg[1],
                               allow_missing=allow_missing)
        parts.append((aligned, offset))
        offset += seg[1]
    first = parts[0][0]

    def joined(field):
        return tuple(tuple(x + off for a, off in parts for x in getattr(a, field)[row])
                     for row in range(len(first)))

    labels = tuple(tuple(x for a, _ in parts for x in a.labels[row]) for row in range(len(first)))
    return AlignedTokens(first.prompts, first.ref_prompts, joined("tokens"), joined("ref_tokens"), labels,
                         which)


__all__ = ["AlignedTokens", "align_tokens", "align_joint_tokens"]
