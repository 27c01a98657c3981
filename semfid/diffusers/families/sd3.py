"""SD3 / SD3.5 (``SD3Transformer2DModel``): joint MMDiT blocks, keys ``[image, text]``.

Every ``transformer_blocks.i.attn`` attends over the image tokens of the patch grid followed by the
text tokens (``context_embedder(encoder_hidden_states)``: 77 CLIP + 256 T5 for SD3 at its defaults),
with optional RMS qk-norm on both streams (SD3.5). SD3.5 medium adds a self-attention ``attn2`` to its
first 13 blocks (image tokens only: no text keys, never captured). Per-call state travels in
``joint_attention_kwargs``.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from ..requests import CallStateProtocol
from .base import ArgGetter, Family, latent_grid
from .joint import joint_attention, layer_plan
from .reference import ReferenceRecord


def _heads(x: torch.Tensor, batch: int, heads: int, head_dim: int) -> torch.Tensor:
    """[B, L, H·D] → [B, H, L, D] (a view, as in ``JointAttnProcessor2_0``)."""
    return x.view(batch, -1, heads, head_dim).transpose(1, 2)


class SemfidJointAttnProcessor:
    r"""diffusers' ``JointAttnProcessor2_0``, step for step, with semfid's ops when maps are asked for.

    Built with no arguments (diffusers' ``type(old)()`` in ``unload_ip_adapter``) it belongs to no
    controller and runs ``JointAttnProcessor2_0``'s math; the next ``with`` block swaps in one of its
    own. A deep copy is a ``JointAttnProcessor2_0`` (``copy.deepcopy`` of an installed model is stock).

    Args:
        name (`str`, *optional*): the layer name; owner (*optional*): the controller's identity
            token; active (`bool`): this layer may capture maps (its keys include the text and
            ``install(layers=...)`` chose it; never without an owner).
    """

    def __init__(self, name: Optional[str] = None, owner: object = None, active: bool = False):
        self.name = name
        self.owner = owner
        self.active = bool(active) and owner is not None

    def __repr__(self) -> str:
        return f"SemfidJointAttnProcessor(name={self.name!r}, active={self.active})"

    def stock(self, memo: Optional[dict] = None):
        """The ``JointAttnProcessor2_0`` this processor stands in for (``uninstall``, deep copies)."""
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        return JointAttnProcessor2_0()

    def __deepcopy__(self, memo):
        return self.stock(memo)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        semfid_call: Optional[CallStateProtocol] = None,
        semfid_ref_record: Optional[ReferenceRecord] = None,
        semfid_ref_keys: Optional[Dict[str, torch.Tensor]] = None,
    ):
        r"""Run the joint attention layer.

        Args:
            attn (`Attention`): the diffusers module owning this processor.
            hidden_states (`torch.Tensor` [B, N_img, C]): image stream.
            encoder_hidden_states (`torch.Tensor` [B, M, C], *optional*): text stream; ``None`` in
                SD3.5 medium's ``attn2`` (self-attention over the image).
            attention_mask: ignored, as ``JointAttnProcessor2_0`` ignores it.
            semfid_call, semfid_ref_record, semfid_ref_keys (*optional*): per-call state from
                ``joint_attention_kwargs`` (maps / loss plans; the reference pass's key record; the
                reference keys of the loss pass, :mod:`.reference`).

        Returns:
            `(image, text)` outputs ([B, N_img, C], [B, M, C]) of a joint layer, else the image
            output alone.
        """
        plan = layer_plan(self.name, self.owner, self.active and encoder_hidden_states is not None,
                          semfid_call)
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (_heads(t, batch_size, attn.heads, head_dim) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if encoder_hidden_states is not None:
            ctx_q = _heads(attn.add_q_proj(encoder_hidden_states), batch_size, attn.heads, head_dim)
            ctx_k = _heads(attn.add_k_proj(encoder_hidden_states), batch_size, attn.heads, head_dim)
            ctx_v = _heads(attn.add_v_proj(encoder_hidden_states), batch_size, attn.heads, head_dim)
            if attn.norm_added_q is not None:
                ctx_q = attn.norm_added_q(ctx_q)
            if attn.norm_added_k is not None:
                ctx_k = attn.norm_added_k(ctx_k)
            query = torch.cat([query, ctx_q], dim=2)
            key = torch.cat([key, ctx_k], dim=2)
            value = torch.cat([value, ctx_v], dim=2)

        n_img = residual.shape[1]
        if semfid_ref_record is not None and encoder_hidden_states is not None:
            semfid_ref_record.put(self.name, self.owner, key[:, :, n_img:])
        if plan is None or not plan.wants_maps:
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        else:
            out = joint_attention(self.name, query, key, value, scale=head_dim ** -0.5, attn_bias=None,
                                  plan=plan, call=semfid_call, text=(n_img, key.shape[2]),
                                  image=(0, n_img), ref_keys=semfid_ref_keys)
        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (hidden_states[:, : residual.shape[1]],
                                                    hidden_states[:, residual.shape[1]:])
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class SD3Family(Family):
    """``SD3Transformer2DModel``: the joint ``attn`` of every block; grid = latent side // patch."""

    name = "sd3"
    latent_arg = "hidden_states"
    kwargs_arg = "joint_attention_kwargs"
    replaceable = ("JointAttnProcessor2_0", "SemfidJointAttnProcessor")
    joint = True

    def __init__(self, model: torch.nn.Module):
        self._patch = int(model.config.patch_size)
        self._text_width = int(model.context_embedder.in_features)

    def text_layers(self, modules):
        return {n: m for n, m in modules.items() if getattr(m, "added_kv_proj_dim", None) is not None}

    def make_processor(self, name, module, owner, active):
        return SemfidJointAttnProcessor(name, owner, active=active)

    def grids(self, get: ArgGetter, names):
        grid = latent_grid(get(self.latent_arg), self._patch)
        return {n: grid for n in names}

    def key_width(self, module):  # reference prompts come in as the model's encoder_hidden_states
        return self._text_width

    value_width = key_width


__all__ = ["SemfidJointAttnProcessor", "SD3Family"]
