"""Public functional API: fused cross-attention with selected maps, and the subject-wise loss.

Two pairs of ``torch.library`` custom ops carry the work (:mod:`semfid._custom_ops`):
``semfid::xattn_fwd`` / ``xattn_bwd`` (:func:`cross_attention`, :func:`attention_maps`) and
``semfid::subject_fwd`` / ``subject_bwd`` (:func:`subject_attention`). Inputs are validated once,
in Python, and the backend is chosen there (memoised per shape class).

Joint key sets (SD3 / Flux joint attention, PixArt-style long cross-attention): any number of
keys; ``select`` / ``tokens`` index the whole key axis, ``map_queries=(start, stop)`` restricts
the maps and the loss to some queries, ``ref_segment=(start, stop)`` says which keys ``k_ref``
replaces.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ._custom_ops import run_subject, run_xattn
from ._inputs import SubjectInputs, TokenSelection, TokensLike, XattnInputs

Tensor = torch.Tensor


def _zero_ragged_padding(maps: Tensor, selection: Optional[TokenSelection]) -> Tensor:
    """Maps of ragged rows come back padded to the longest row: zero the padding columns."""
    if selection is None or selection.weights is None:
        return maps
    mask = selection.valid_mask()
    return maps * (mask[:, None, :] if maps.dim() == 3 else mask[:, None, None, :])


# ------------------------------------------------------------------------------------------------
# public functions
# ------------------------------------------------------------------------------------------------
def cross_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: Optional[float] = None,
    attn_bias: Optional[Tensor] = None,
    select: TokensLike = None,
    head_reduce: str = "mean",
    backend: str = "auto",
    map_queries: Optional[Tuple[int, int]] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    r"""Fused attention ``out = softmax(q kᵀ · scale + attn_bias) v``, optionally with map columns.

    Args:
        q (`Tensor` [B, H, N, D]): queries (float16, bfloat16, float32 or float64; any strides).
        k (`Tensor` [B, H, M, D]): keys, same dtype and device as ``q``.
        v (`Tensor` [B, H, M, Dv]): values.
        scale (`float`, *optional*, defaults to ``D ** -0.5``): logit scale.
        attn_bias (`Tensor`, *optional*): additive per-key bias, [B, M], [B, 1, M], [B, 1, 1, M] or
            [B, H, 1, M]; ``-inf`` or ``-10000`` masks a key. A row whose keys are all ``-inf`` gives
            zeros. Not differentiable.
        select (`Tensor` / `list` / `TokenSelection`, *optional*): key indices [S] (shared by the
            batch), [B, S], a ragged list of per-row lists (maps padded with zeros), or a
            :class:`semfid.TokenSelection`; duplicates allowed; anywhere on the key axis (e.g. the
            text columns of a joint [image, text] or [text, image] key set). When given, the
            selected probability columns are returned.
        head_reduce (`str`, *optional*, defaults to ``"mean"``): ``"mean"`` averages the maps over
            heads, ``"none"`` keeps them per head.
        backend (`str`, *optional*, defaults to ``"auto"``): ``"auto"``, ``"torch"``, ``"sdpa"``,
            ``"triton"`` or ``"cuda"`` (see ``python -m semfid.info``).
        map_queries (`(int, int)`, *optional*, defaults to ``(0, N)``): the queries
            ``start..stop-1`` the maps cover (e.g. the image queries of a joint block); ``out``
            covers all N. The maps stay normalised over all M keys.

    Returns:
        ``out`` [B, H, N, Dv] in the dtype of ``q`` when ``select`` is None, else ``(out, maps)``
        with ``maps = P[..., map_queries, select]`` as [B, Nm, S] (``"mean"``) or [B, H, Nm, S]
        (``"none"``), Nm = stop − start, in float32 (float64 for float64 inputs). Both are
        differentiable w.r.t. q, k and v.
    """
    if v is None:
        raise TypeError("v must be a torch.Tensor [B, H, M, Dv], got None")
    inp = XattnInputs.validate(q, k, v, scale=scale, attn_bias=attn_bias, select=select,
                               head_reduce=head_reduce, map_queries=map_queries)
    out, _, maps = run_xattn(inp, backend)
    return out if select is None else (out, _zero_ragged_padding(maps, inp.selection))


def subject_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_ref: Tensor,
    *,
    tokens: TokensLike,
    ref_tokens: TokensLike = None,
    scale: Optional[float] = None,
    attn_bias: Optional[Tensor] = None,
    ref_attn_bias: Optional[Tensor] = None,
    head_reduce: str = "mean",
    detach_reference: bool = True,
    return_maps: bool = False,
    backend: str = "auto",
    map_queries: Optional[Tuple[int, int]] = None,
    ref_segment: Optional[Tuple[int, int]] = None,
) -> Union[Tuple[Tensor, Tensor], Tuple[Tensor, Tensor, Tensor]]:
    r"""Cross-attention output plus the subject-wise attention loss against reference keys.

    ``A_t = softmax(q kᵀ·s + attn_bias)[..., tokens]`` and ``A_r = softmax(q k_refᵀ·s +
    ref_attn_bias)[..., ref_tokens]``, both reduced over heads by ``head_reduce``;
    ``loss[b] = mean((A_t − A_r)²)`` over every non-batch dim (over row b's own tokens when rows
    are ragged). The same ``q`` is used for both (SeFi-IDE's subject-wise attention loss); both key
    sets, the maps and the loss come out of one fused pass (``semfid::subject_fwd``), and backward
    is one pass too.

    Args:
        q, k, v: as in :func:`cross_attention`.
        k_ref (`Tensor` [B, H, M_ref, D]): keys of the reference prompt.
        tokens (`Tensor` / `list` / `TokenSelection`): [S] or [B, S] target-prompt token
            indices, a ragged list of B per-row lists, or a :class:`semfid.TokenSelection`.
        ref_tokens (*optional*, defaults to ``tokens``): reference-prompt token indices in the same
            forms, as many per row as ``tokens``.
        scale, attn_bias, head_reduce, backend: as in :func:`cross_attention`.
        ref_attn_bias (`Tensor`, *optional*): additive per-key bias for ``k_ref``. Not differentiable.
        detach_reference (`bool`, *optional*, defaults to ``True``): when True no gradient flows
            through ``A_r`` (neither to ``k_ref`` nor to ``q``); ``q`` still gets the ``A_t`` path.
        return_maps (`bool`, *optional*, defaults to ``False``): also return the target maps
            ``A_t`` (differentiable; ragged rows padded with zeros).
        map_queries (`(int, int)`, *optional*, defaults to ``(0, N)``): the queries the maps and
            the loss cover (the loss is the mean over them); ``out`` covers all N.
        ref_segment (`(int, int)`, *optional*, defaults to ``(0, M)``): the keys
            ``k[:, :, start:stop]`` that ``k_ref`` replaces (e.g. the text keys of a joint
            block); ``k_ref`` may be longer or shorter than the segment. A_r is the softmax over
            ``cat(k[:, :, :start], k_ref, k[:, :, stop:])`` (the bias of the outside keys, then
            ``ref_attn_bias``), on which ``ref_tokens`` index. The default is the UNet meaning.

    Returns:
        ``(out, loss)``, or ``(out, loss, maps_t)`` with ``return_maps``: ``out`` [B, H, N, Dv]
        exactly as :func:`cross_attention`, ``loss`` [B] and ``maps_t`` [B, Nm, S] /
        [B, H, Nm, S] in float32 (float64 for float64 inputs).
    """
    inp = SubjectInputs.validate(
        q, k, v, k_ref, tokens=tokens, ref_tokens=ref_tokens, scale=scale, attn_bias=attn_bias,
        ref_attn_bias=ref_attn_bias, head_reduce=head_reduce, detach_reference=detach_reference,
        return_maps=return_maps, map_queries=map_queries, ref_segment=ref_segment,
    )
    out, loss, maps = run_subject(inp, backend)
    if return_maps:
        return out, loss, _zero_ragged_padding(maps, inp.selection)
    return out, loss


def attention_maps(
    q: Tensor,
    k: Tensor,
    *,
    select: TokensLike,
    scale: Optional[float] = None,
    attn_bias: Optional[Tensor] = None,
    head_reduce: str = "mean",
    backend: str = "auto",
    map_queries: Optional[Tuple[int, int]] = None,
) -> Tensor:
    r"""Only the selected probability columns ``softmax(q kᵀ · scale + attn_bias)[..., select]``.

    A maps-only pass (no values, no output): what the reference branch of
    :func:`subject_attention` computes. Same arguments (``map_queries`` too) and map layout as
    :func:`cross_attention`; differentiable w.r.t. q and k.
    """
    if select is None:
        raise ValueError("select must give key indices ([S] or [B, S]), got None")
    inp = XattnInputs.validate(q, k, None, scale=scale, attn_bias=attn_bias, select=select,
                               head_reduce=head_reduce, map_queries=map_queries)
    return _zero_ragged_padding(run_xattn(inp, backend)[2], inp.selection)


__all__ = ["cross_attention", "subject_attention", "attention_maps", "TokenSelection"]
