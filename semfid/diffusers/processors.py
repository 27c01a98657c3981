"""The semfid attention processor for diffusers' legacy ``Attention`` class (SD1.5 / SDXL UNets).

:class:`SemfidAttnProcessor` runs diffusers' ``AttnProcessor2_0`` template step for step:

1. residual, ``spatial_norm``; 4D → 3D; ``prepare_attention_mask``; ``group_norm``  (:func:`_prologue`)
2. ``to_q``; ``norm_cross``; ``to_k`` / ``to_v``; split heads; ``norm_q`` / ``norm_k``
3. attention: PyTorch SDPA, or semfid's fused ops when maps or the subject loss are requested
4. merge heads; ``to_out[0]``, ``to_out[1]``; 3D → 4D; ``residual_connection``;
   ``/ rescale_output_factor``  (:func:`_epilogue`)

with ``scale=attn.scale`` passed to every attention call (``AttnProcessor2_0`` leaves it to SDPA's
default, which equals ``attn.scale`` for SD1.5 / SDXL).

Self-attention (``attn1``) and cross-attention layers with nothing requested always take the SDPA
path: the output then equals ``AttnProcessor2_0``'s and costs the same. A cross-attention layer
switches to :func:`semfid.cross_attention` / :func:`semfid.subject_attention` /
:func:`semfid.attention_maps` only while a :class:`~semfid.diffusers.controller.SemfidController`
context asks for maps or the loss of that layer.

What a processor does in one UNet call is decided by a per-call state object that the controller
puts into ``cross_attention_kwargs`` under the key ``semfid_call`` (a named parameter of
:meth:`SemfidAttnProcessor.__call__`, so diffusers forwards it). Because the state travels with the
call, gradient checkpointing's recompute during backward sees exactly what the forward saw, even
after the ``with`` block has exited.

``torch.compile``: no graph break on either path, and nothing read from ``semfid_call`` is guarded
on by identity or per-step value, so a compiled model does not recompile when a new block brings
new tensors (see :mod:`semfid.diffusers.controller`, "Limits").
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from ..ops import attention_maps, cross_attention, subject_attention
from .requests import CallStateProtocol, LayerPlan

#: ``cross_attention_kwargs`` key carrying the per-call state (must match ``__call__``'s parameter).
CALL_KWARG = "semfid_call"


class _Prologue(NamedTuple):
    residual: torch.Tensor
    hidden_states: torch.Tensor  # [B, N, C] after spatial_norm and group_norm
    attention_mask: Optional[torch.Tensor]  # [B, H, 1 or N, M] as AttnProcessor2_0 shapes it
    input_ndim: int
    spatial: Optional[Tuple[int, int, int]]  # (channel, height, width) of a 4D input


def _prologue(attn, hidden_states, encoder_hidden_states, attention_mask, temb) -> _Prologue:
    """Template steps before ``to_q``: residual, spatial_norm, 4D→3D, prepare_attention_mask, group_norm."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)

    input_ndim = hidden_states.ndim
    spatial = None
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        spatial = (channel, height, width)

    batch_size, sequence_length, _ = (
        hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
    )
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return _Prologue(residual, hidden_states, attention_mask, input_ndim, spatial)


def _epilogue(attn, out: torch.Tensor, query_dtype: torch.dtype, pro: _Prologue) -> torch.Tensor:
    """Template steps after attention: merge heads, to_out[0], to_out[1], 3D→4D, residual, rescale.

    Args:
        out (`torch.Tensor` [B, H, N, D]): attention output per head.
    """
    batch_size, heads, _, head_dim = out.shape
    hidden_states = out.transpose(1, 2).reshape(batch_size, -1, heads * head_dim)
    hidden_states = hidden_states.to(query_dtype)

    hidden_states = attn.to_out[0](hidden_states)  # linear projection
    hidden_states = attn.to_out[1](hidden_states)  # dropout

    if pro.input_ndim == 4:
        channel, height, width = pro.spatial
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + pro.residual
    hidden_states = hidden_states / attn.rescale_output_factor
    return hidden_states


def _split_heads(x: torch.Tensor, batch_size: int, heads: int, head_dim: int) -> torch.Tensor:
    """[B, L, H·D] → [B, H, L, D] (a view, as in ``AttnProcessor2_0``)."""
    return x.view(batch_size, -1, heads, head_dim).transpose(1, 2)


def _additive_bias(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """An SDPA ``attn_mask`` as the additive float bias semfid's ops take (bool: True keeps)."""
    if mask is None or mask.is_floating_point():
        return mask
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
            ~mask, float("-inf")
        )
    raise TypeError(f"attention_mask must be a float bias or a bool keep-mask, got dtype {mask.dtype}")


class SemfidAttnProcessor:
    r"""Attention processor that can return cross-attention maps and the subject-wise loss.

    Installed by :func:`semfid.diffusers.install` on every ``Attention`` module of a UNet (so that
    the ``semfid_call`` entry of ``cross_attention_kwargs`` is accepted everywhere without
    diffusers' "unexpected kwargs" warning). Self-attention and cross-attention layers with nothing
    requested run ``F.scaled_dot_product_attention`` exactly like ``AttnProcessor2_0``.

    It can be built with no arguments, as diffusers rebuilds processors (``type(old)()`` in
    ``load_ip_adapter`` / ``unload_ip_adapter``): such a processor belongs to no controller and runs
    ``AttnProcessor2_0``'s math; the controller swaps in a processor of its own at the next ``with``
    block (:mod:`semfid.diffusers.adoption`). A deep copy is the stock processor it stands in for
    (``AttnProcessor2_0``), so ``copy.deepcopy`` of an installed UNet gives a stock UNet.

    Args:
        name (`str`, *optional*): the layer name (processor key without ``.processor``).
        owner (`object`, *optional*): identity token of the controller that installed it; a call
            state of another controller is rejected.
        active (`bool`, *optional*, defaults to `False`): whether this cross-attention layer was
            chosen by ``install(..., layers=...)`` and may capture maps / compute the loss.

    Raises:
        ImportError: PyTorch lacks ``scaled_dot_product_attention`` (install ``torch>=2.1``).
    """

    def __init__(self, name: Optional[str] = None, owner: Any = None, active: bool = False):
        if not hasattr(F, "scaled_dot_product_attention"):
            raise ImportError(
                "SemfidAttnProcessor needs torch.nn.functional.scaled_dot_product_attention with a "
                "`scale` argument: install PyTorch >= 2.1 (pip install -U 'torch>=2.1')."
            )
        self.name = name
        self.owner = owner
        self.active = bool(active) and owner is not None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, active={self.active})"

    def __deepcopy__(self, memo):
        from .adoption import stock_equivalent  # adoption imports this module

        return stock_equivalent(self, memo)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        semfid_call: Optional[CallStateProtocol] = None,
    ) -> torch.Tensor:
        r"""Run the attention layer.

        Args:
            attn (`Attention`): the diffusers module owning this processor.
            hidden_states (`torch.Tensor` [B, N, C] or [B, C, h, w]): query-side states.
            encoder_hidden_states (`torch.Tensor` [B, M, C_text], *optional*): text states
                (cross-attention); ``None`` for self-attention.
            attention_mask (`torch.Tensor`, *optional*): additive bias; for cross-attention the UNet
                passes ``encoder_attention_mask`` as ``(1 - m) · -10000`` with shape [B, 1, M].
            temb (`torch.Tensor`, *optional*): time embedding for ``spatial_norm``.
            semfid_call (*optional*): per-call state put into ``cross_attention_kwargs`` by the
                controller; ``None`` means nothing is requested.

        Returns:
            `torch.Tensor` shaped like ``hidden_states``.
        """
        out, query, pro, _ = self._attend(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                          semfid_call)
        return _epilogue(attn, out, query.dtype, pro)

    def _attend(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, semfid_call):
        """Template steps up to the text attention: ``(out [B, H, N, D], query [B, H, N, D], prologue,
        plan)``; the IP-Adapter processor adds its image branch to ``out`` before the epilogue."""
        plan = None
        if semfid_call is not None and encoder_hidden_states is not None and self.active:
            if semfid_call.owner is not self.owner:
                raise RuntimeError(
                    f"layer {self.name}: cross_attention_kwargs['{CALL_KWARG}'] comes from another "
                    "semfid controller; do not pass it by hand between UNets"
                )
            plan = semfid_call.plans.get(self.name)  # built once per UNet call, checked there

        pro = _prologue(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        hidden_states = pro.hidden_states
        batch_size = hidden_states.shape[0]

        query = attn.to_q(hidden_states)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        value_source = encoder_hidden_states
        if plan is not None and plan.value_states is not None:
            value_source = plan.value_states
            if attn.norm_cross:
                value_source = attn.norm_encoder_hidden_states(value_source)

        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(value_source)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = _split_heads(query, batch_size, attn.heads, head_dim)
        key = _split_heads(key, batch_size, attn.heads, head_dim)
        value = _split_heads(value, value.shape[0], attn.heads, head_dim)
        if value.shape[0] != batch_size:  # value_states given once for the whole batch
            value = value.expand(batch_size, -1, -1, -1)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if plan is None or not plan.wants_maps:
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=pro.attention_mask, dropout_p=0.0, is_causal=False,
                scale=attn.scale,
            )
        else:
            out = self._mapped_attention(attn, query, key, value, pro.attention_mask, plan,
                                         semfid_call, head_dim)
        return out, query, pro, plan

    # ------------------------------------------------------------------------------------------
    def _mapped_attention(self, attn, query, key, value, mask, plan: LayerPlan,
                          call: CallStateProtocol, head_dim: int):
        """Cross-attention through semfid's ops; records maps / losses on the call state.

        The token selections in ``plan`` already live on the call's device and were checked
        against the call's sizes: the ops only compare sizes here (no copy, no host sync).
        """
        bias = _additive_bias(mask)
        captures = plan.captures
        item = plan.loss
        if item is not None:
            with torch.no_grad():  # the reference branch is detached: no graph for to_k(ref)
                states = item.reference_states
                if attn.norm_cross:
                    states = attn.norm_encoder_hidden_states(states)
                k_ref = _split_heads(attn.to_k(states), states.shape[0], attn.heads, head_dim)
                if attn.norm_k is not None:
                    k_ref = attn.norm_k(k_ref)
            if k_ref.shape[0] != query.shape[0]:  # one reference prompt for the whole batch
                k_ref = k_ref.expand(query.shape[0], -1, -1, -1)
            if item.ref_bias is not None:
                ref_bias = item.ref_bias
            elif bias is not None and k_ref.shape[2] == key.shape[2]:
                ref_bias = bias  # same token layout: the target's padding mask applies
            else:
                ref_bias = None
            res = subject_attention(
                query, key, value, k_ref, tokens=item.tokens, ref_tokens=item.ref_tokens,
                scale=attn.scale, attn_bias=bias, ref_attn_bias=ref_bias,
                head_reduce=item.head_reduce, return_maps=item.keep_maps,
            )
            out, loss = res[0], res[1]
            call.record(item, self.name, loss, res[2] if item.keep_maps else None)
        else:
            first, captures = captures[0], captures[1:]
            out, maps = cross_attention(
                query, key, value, scale=attn.scale, attn_bias=bias, select=first.tokens,
                head_reduce=first.head_reduce,
            )
            call.record(first, self.name, maps)
        for req in captures:  # further (nested) captures: maps-only passes
            maps = attention_maps(query, key, select=req.tokens, scale=attn.scale, attn_bias=bias,
                                  head_reduce=req.head_reduce)
            call.record(req, self.name, maps)
        return out


__all__ = ["SemfidAttnProcessor", "CALL_KWARG"]
