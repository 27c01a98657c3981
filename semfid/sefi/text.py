"""Prompt encoding with learned placeholder embeddings inserted before the frozen text transformer.

A prompt such as ``"a photo of <v1> and <v2>"`` is tokenized piece by piece: the text between
placeholders goes through the pipeline's own tokenizer, and each placeholder occupies ``n`` slots whose
token embeddings are replaced (by a forward hook on ``embeddings.token_embedding``) with the learned
vectors. Position embeddings, the causal text transformer and pooling then run exactly as for any prompt.
Nothing is added to the tokenizer's vocabulary and the text encoder's embedding matrix is untouched, so
the user's pipeline folder stays as it is.

SD1.5: the states are CLIP-L's last hidden state (after the final layer norm), [B, 77, 768].
SDXL: the penultimate hidden states of both encoders concatenated, [B, 77, 768 + 1280], and the pooled
``text_embeds`` of encoder 2, [B, 1280].
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import List, Mapping, Optional, Sequence, Tuple

import torch

from .checks import placeholder_pattern
from .errors import SefiInputError

Tensor = torch.Tensor


@dataclass
class Segment:
    """A run of tokens of one prompt: text, or the ``n`` slots of a placeholder."""

    start: int
    length: int
    placeholder: Optional[str] = None  # None for text


@dataclass
class PromptLayout:
    r"""Token layout of one prompt for one tokenizer.

    Attributes:
        input_ids (`List[int]`): ``max_length`` ids; placeholder slots hold a filler id that the
            embedding hook overwrites.
        segments (`List[Segment]`): the runs between the start token (position 0) and the end token.
        eos_index (`int`): position of the end-of-text token; positions ``0 .. eos_index`` are the
            prompt's real tokens.
        labels (`List[str]`): readable label of each real token (the placeholder's name for its slots).
    """

    input_ids: List[int]
    segments: List[Segment] = field(default_factory=list)
    eos_index: int = 0
    labels: List[str] = field(default_factory=list)

    @property
    def slots(self) -> List[Tuple[str, int, int]]:
        """(placeholder, position, vector index) for every placeholder slot, in order."""
        return [(s.placeholder, s.start + j, j) for s in self.segments if s.placeholder for j in range(s.length)]


@dataclass
class TextStates:
    r"""Text-encoder states of a batch of prompts.

    Attributes:
        hidden (`Tensor` [B, L, D]): cross-attention states (D = the UNet's ``cross_attention_dim``).
        pooled (`Tensor` [B, P], *optional*): SDXL's pooled ``text_embeds`` (None for SD1.5).
    """

    hidden: Tensor
    pooled: Optional[Tensor] = None

    def rows(self, index: slice) -> "TextStates":
        """The states of the prompts ``index`` selects (a slice of the batch)."""
        return TextStates(self.hidden[index], None if self.pooled is None else self.pooled[index])


def token_widths(text_encoders: Sequence[torch.nn.Module]) -> List[int]:
    """Token-embedding width of each text encoder (768 for CLIP-L, 1280 for OpenCLIP bigG)."""
    return [int(te.get_input_embeddings().weight.shape[1]) for te in text_encoders]


def _clean_label(token: str) -> str:
    return token[:-4] if token.endswith("</w>") else token


class PromptEncoder:
    r"""Encodes prompts with placeholders through a pipeline's frozen CLIP text encoder(s).

    Args:
        tokenizers (`Sequence`): the pipeline's CLIP tokenizers (one for SD1.5, two for SDXL).
        text_encoders (`Sequence[torch.nn.Module]`): ``CLIPTextModel`` (SD1.5) or ``CLIPTextModel`` +
            ``CLIPTextModelWithProjection`` (SDXL), frozen.
        kind (`str`): ``"sd15"`` or ``"sdxl"``.
    """

    def __init__(self, tokenizers: Sequence, text_encoders: Sequence[torch.nn.Module], kind: str):
        if len(tokenizers) != len(text_encoders):
            raise ValueError(f"need one tokenizer per text encoder, got {len(tokenizers)} and "
                             f"{len(text_encoders)}")
        self.tokenizers, self.text_encoders, self.kind = list(tokenizers), list(text_encoders), kind

    @property
    def token_widths(self) -> List[int]:
        """Token-embedding width of each text encoder (see :func:`token_widths`)."""
        return token_widths(self.text_encoders)

    # -------------------------------------------------------------------------------------------
    # tokenization
    # -------------------------------------------------------------------------------------------
    def word_embeddings(self, word: str) -> List[Tensor]:
        r"""Token embedding of ``word`` for each encoder (the mean if it spans several tokens), [d_e]."""
        out = []
        for tok, te in zip(self.tokenizers, self.text_encoders):
            ids = tok(word, add_special_tokens=False).input_ids
            if not ids:
                raise SefiInputError(f"the word {word!r} gives no tokens")
            table = te.get_input_embeddings().weight
            out.append(table[torch.tensor(ids, device=table.device)].detach().float().mean(0).cpu())
        return out

    def layout(self, prompt: str, num_vectors: Mapping[str, int],
               substitute: Optional[Mapping[str, str]] = None) -> List[PromptLayout]:
        r"""Tokenize ``prompt`` with each tokenizer, reserving ``num_vectors[p]`` slots per placeholder.

        Args:
            prompt (`str`): text; placeholders are matched as whole words (longest first, see
                :func:`~semfid.sefi.checks.placeholder_pattern`).
            num_vectors (`Mapping[str, int]`): placeholder -> n.
            substitute (`Mapping[str, str]`, *optional*): placeholder -> word; when given, that
                placeholder's segment holds the word's tokens instead of slots (the reference prompt,
                with segments still aligned to the target's).

        Returns:
            `List[PromptLayout]`: one per tokenizer.

        Raises:
            SefiInputError: the prompt does not fit the tokenizer's length.
        """
        pattern = placeholder_pattern(list(num_vectors))
        pieces: List[Tuple[Optional[str], str]] = []  # (placeholder or None, text)
        pos = 0
        for match in (pattern.finditer(prompt) if pattern else ()):
            pieces.append((None, prompt[pos:match.start()]))
            pieces.append((match.group(0), match.group(0)))
            pos = match.end()
        pieces.append((None, prompt[pos:]))
        return [self._layout_one(tok, pieces, num_vectors, substitute or {}, prompt)
                for tok in self.tokenizers]

    @staticmethod
    def _layout_one(tok, pieces, num_vectors, substitute, prompt) -> PromptLayout:
        max_length = int(tok.model_max_length)
        ids, labels, segments = [tok.bos_token_id], ["<start>"], []
        for ph, text in pieces:
            if ph is not None and ph not in substitute:
                n = int(num_vectors[ph])
                segments.append(Segment(len(ids), n, ph))
                ids += [tok.bos_token_id] * n  # filler, overwritten by the embedding hook
                labels += [ph if n == 1 else f"{ph}[{j}]" for j in range(n)]
                continue
            word = substitute[ph] if ph is not None else text
            piece_ids = tok(word, add_special_tokens=False).input_ids if word.strip() else []
            segments.append(Segment(len(ids), len(piece_ids), None))
            ids += piece_ids
            labels += [_clean_label(t) for t in tok.convert_ids_to_tokens(piece_ids)]
        if len(ids) + 1 > max_length:
            raise SefiInputError(
                f"the prompt {prompt!r} is {len(ids) + 1} tokens long, the text encoder takes at most "
                f"{max_length}"
            )
        eos = len(ids)
        ids.append(tok.eos_token_id)
        labels.append("<end>")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids += [pad] * (max_length - len(ids))
        return PromptLayout(ids, segments, eos, labels)

    # -------------------------------------------------------------------------------------------
    # encoding
    # -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _inserted(self, encoder_index: int, positions: Tensor, vectors: Tensor):
        """Hook that replaces token embeddings at ``positions`` ([K, 2]: batch, pos) by ``vectors``."""
        module = self.text_encoders[encoder_index].get_input_embeddings()

        def hook(_module, _inputs, output):
            if positions.numel() == 0:
                return output
            values = vectors.to(dtype=output.dtype, device=output.device)
            return output.index_put((positions[:, 0].to(output.device), positions[:, 1].to(output.device)),
                                    values)

        handle = module.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def encode(self, layouts: Sequence[Sequence[PromptLayout]],
               fills: Optional[Sequence[Mapping[str, Sequence[Tensor]]]] = None) -> TextStates:
        r"""Run the text encoder(s) on a batch of laid-out prompts with learned slot embeddings.

        Args:
            layouts (`Sequence[Sequence[PromptLayout]]`): per prompt, the per-encoder layouts from
                :meth:`layout`.
            fills (`Sequence[Mapping[str, Sequence[Tensor]]]`, *optional*): per prompt,
                ``placeholder -> [vectors [n, d_e] per encoder]``. Required when a layout has slots.
                Gradients flow back into these vectors.

        Returns:
            `TextStates` with ``hidden`` [B, L, D] and (SDXL) ``pooled`` [B, P].
        """
        outputs = []
        for e, te in enumerate(self.text_encoders):
            device = te.get_input_embeddings().weight.device
            ids = torch.tensor([lay[e].input_ids for lay in layouts], device=device)
            positions, vectors = [], []
            for b, lay in enumerate(layouts):
                for ph, pos, j in lay[e].slots:
                    if fills is None or ph not in fills[b]:
                        raise ValueError(f"no embeddings given for placeholder {ph!r} of prompt {b}")
                    positions.append((b, pos))
                    vectors.append(fills[b][ph][e][j])
            pos_t = torch.tensor(positions, dtype=torch.long).reshape(-1, 2)
            vec_t = torch.stack(vectors) if vectors else torch.zeros(0, self.token_widths[e])
            with self._inserted(e, pos_t, vec_t):
                outputs.append(te(input_ids=ids, output_hidden_states=self.kind == "sdxl"))
        if self.kind == "sd15":
            return TextStates(outputs[0].last_hidden_state)
        hidden = torch.cat([out.hidden_states[-2] for out in outputs], dim=-1)
        return TextStates(hidden, outputs[-1].text_embeds)

    def encode_key_value(self, layouts: Sequence[Sequence[PromptLayout]],
                         pairs: Mapping[str, Sequence[Tuple[Tensor, Tensor]]]) -> Tuple[TextStates, TextStates]:
        r"""Key states (P^K in the slots) and value states (P^V) of the same prompts, in one batch.

        SeFi-IDE's K/V disentanglement: every placeholder slot holds its P^K vector for the key states
        (``encoder_hidden_states``, reaching ``to_k``) and its P^V vector for the value states (reaching
        only ``to_v``); both go through the frozen text encoder(s) as one batch of ``2 · P`` prompts.

        Args:
            layouts (`Sequence[Sequence[PromptLayout]]`): per prompt, the per-encoder layouts (P prompts).
            pairs (`Mapping[str, Sequence[Tuple[Tensor, Tensor]]]`): placeholder -> one ``(P^K, P^V)``
                per text encoder, each [P, n, d_e] (row ``b`` fills prompt ``b``) or [1, n, d_e] (the
                same vectors for every prompt). Gradients flow back into them.

        Returns:
            ``(keys, values)``: :class:`TextStates` with ``hidden`` [P, L, D] (and SDXL ``pooled`` [P, P_d]).
        """
        n = len(layouts)

        def fills(role: int) -> List[dict]:
            return [{ph: [kv[role][b if kv[role].shape[0] > 1 else 0] for kv in per_encoder]
                     for ph, per_encoder in pairs.items()} for b in range(n)]

        both = self.encode(list(layouts) * 2, fills(0) + fills(1))
        return both.rows(slice(None, n)), both.rows(slice(n, None))


def subject_token_indices(target: PromptLayout, reference: PromptLayout) -> Tuple[List[int], List[int]]:
    r"""Token indices of the subject-wise loss: every real target token and its reference token.

    The target prompt (template with the placeholder) and the reference prompt (same template with the
    class word, laid out with ``substitute``) have aligned segments. Text tokens map one to one; slot
    ``j`` of ``n`` maps to class-word token ``floor(j · m / n)`` of ``m``; start and end tokens map to
    each other.

    Returns:
        ``(tokens, ref_tokens)``: equal-length lists covering target positions ``0 .. eos_index``.
    """
    if len(target.segments) != len(reference.segments):
        raise ValueError("target and reference layouts are not aligned (different segment counts)")
    tokens, ref_tokens = [0], [0]
    for st, sr in zip(target.segments, reference.segments):
        for j in range(st.length):
            tokens.append(st.start + j)
            if st.placeholder is not None and sr.length:
                ref_tokens.append(sr.start + j * sr.length // st.length)
            elif sr.length == st.length:
                ref_tokens.append(sr.start + j)
            else:
                raise ValueError("target and reference text segments differ")
    tokens.append(target.eos_index)
    ref_tokens.append(reference.eos_index)
    return tokens, ref_tokens


__all__ = ["PromptEncoder", "PromptLayout", "Segment", "TextStates", "subject_token_indices",
           "placeholder_pattern", "token_widths"]
