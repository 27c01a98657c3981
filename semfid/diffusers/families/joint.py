"""Maps (and losses) in a joint block, where the text keys are one segment of a joint key set.

SD3's joint blocks attend over keys ``[image, text]``, Flux's over ``[text, image]`` (its
single-stream blocks too, on a sequence concatenated before the attention module). The map of a
text token is then a column of one softmax over *all* keys (DESIGN.md §9): :func:`joint_attention`
runs :func:`semfid.cross_attention` on the whole key set with ``select`` = the token positions
moved onto the joint key axis and ``map_queries`` = the image queries, so ``rec.maps`` holds
[B, N_img, S] (or [B, H, N_img, S]) normalised over every key the layer attends to.

``tokens`` stay what they are for UNets: positions in the model call's ``encoder_hidden_states``.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ..._tokens import TokenSelection
from ...ops import attention_maps, cross_attention, subject_attention
from ..processors import CALL_KWARG
from ..requests import CallStateProtocol, LayerPlan
from .reference import reference_for

Tensor = torch.Tensor
Span = Tuple[int, int]


def layer_plan(name: str, owner: object, active: bool, semfid_call) -> Optional[LayerPlan]:
    """This layer's plan in the per-call state, or ``None`` when nothing is asked of it."""
    if semfid_call is None or not active:
        return None
    if semfid_call.owner is not owner:
        raise RuntimeError(
            f"layer {name}: the '{CALL_KWARG}' entry of the call's attention kwargs comes from another "
            "semfid controller; do not pass it by hand between models"
        )
    return semfid_call.plans.get(name)


def on_key_axis(tokens: TokenSelection, offset: int) -> TokenSelection:
    """``tokens`` (positions in the text) as positions on a joint key axis whose text starts at
    ``offset`` (a tensor add on the call's device: no check, copy to host or sync)."""
    if offset == 0:
        return tokens
    return TokenSelection(tokens.index + offset, tokens.weights, tokens.lengths, tokens.max_index + offset)


def joint_attention(name: str, query: Tensor, key: Tensor, value: Tensor, *, scale: float,
                    attn_bias: Optional[Tensor], plan: LayerPlan, call: CallStateProtocol,
                    text: Span, image: Span, ref_keys: Optional[Dict[str, Tensor]] = None) -> Tensor:
    r"""Attention over a joint key set through semfid's ops, recording the maps / loss a plan asks for.

    The subject loss (:func:`semfid.subject_attention`) replaces the text keys (``ref_segment =
    text``) by this layer's keys from the reference pass (:mod:`.reference`); ``ref_tokens`` index
    the reference text the same way ``tokens`` index the call's text.

    Args:
        name (`str`): the layer name (recorder key, error messages).
        query (`torch.Tensor` [B, H, N, D]), key (`torch.Tensor` [B, H, M, D]),
        value (`torch.Tensor` [B, H, M, D]): the joint sequences (N = M for self-attention over the
            joint sequence), after qk-norm and RoPE, exactly as the stock processor builds them.
        scale (`float`): logit scale (the stock processors use SDPA's default, D ** -0.5).
        attn_bias (`torch.Tensor`, *optional*): additive bias over the M keys.
        plan: this layer's plan in the call; call: the per-call state (records the maps).
        text (`(int, int)`): where the text keys lie on the key axis.
        image (`(int, int)`): where the image queries lie on the query axis.
        ref_keys (*optional*): the call's ``semfid_ref_keys`` (needed by a loss plan).

    Returns:
        `torch.Tensor` [B, H, N, D]: the attention output (what SDPA gives, up to rounding).
    """
    if plan.value_states is not None:
        raise ValueError(f"layer {name}: value_states (values blocks) replace the text states of a "
                         "cross-attention layer; a joint block has no separate text values to replace")
    item, captures = plan.loss, plan.captures
    if item is not None:
        k_ref = reference_for(name, ref_keys, query.shape[0])
        res = subject_attention(query, key, value, k_ref, tokens=on_key_axis(item.tokens, text[0]),
                                ref_tokens=on_key_axis(item.ref_tokens, text[0]), scale=scale,
                                attn_bias=attn_bias, ref_attn_bias=item.ref_bias,
                                head_reduce=item.head_reduce, return_maps=item.keep_maps,
                                map_queries=image, ref_segment=text)
        out = res[0]
        call.record(item, name, res[1], res[2] if item.keep_maps else None)
    else:
        first, captures = captures[0], captures[1:]
        out, maps = cross_attention(query, key, value, scale=scale, attn_bias=attn_bias,
                                    select=on_key_axis(first.tokens, text[0]),
                                    head_reduce=first.head_reduce, map_queries=image)
        call.record(first, name, maps)
    for req in captures:  # further (nested) captures: maps-only passes
        maps = attention_maps(query, key, select=on_key_axis(req.tokens, text[0]), scale=scale,
                              attn_bias=attn_bias, head_reduce=req.head_reduce, map_queries=image)
        call.record(req, name, maps)
    return out


__all__ = ["layer_plan", "on_key_axis", "joint_attention"]
