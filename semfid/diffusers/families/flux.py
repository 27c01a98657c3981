"""Flux.1 (``FluxTransformer2DModel``): joint blocks with keys ``[text, image]`` and RoPE on q / k.

* Double-stream blocks (``transformer_blocks.i.attn``): text and image streams projected apart,
  concatenated ``[text, image]`` inside the processor (the text length is
  ``encoder_hidden_states.shape[1]`` there).
* Single-stream blocks (``single_transformer_blocks.i.attn``): the block concatenates
  ``[text, image]`` *before* the attention module, so the processor never sees the text length;
  the controller passes it per call (``joint_attention_kwargs["semfid_text_len"]``, the model call's
  ``encoder_hidden_states.shape[1]``).

The processor keeps honouring ``model.set_attention_backend(...)``: with nothing requested it calls
diffusers' ``dispatch_attention_fn`` with its ``_attention_backend`` (copied from the processor it
replaced at install, reset by ``set_attention_backend`` / ``reset_attention_backend`` as diffusers'
own are). The query grid comes from the call's ``img_ids`` (latent rows / columns after packing).
"""

from __future__ import annotations

import copy
from typing import Dict, Optional

import torch

from ..processors import _additive_bias
from ..requests import CallStateProtocol
from .base import ArgGetter, Family
from .joint import joint_attention, layer_plan
from .reference import ReferenceRecord

#: joint_attention_kwargs key carrying the text length to the single-stream processors
TEXT_LEN_KWARG = "semfid_text_len"


def _flux_parts():
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    return dispatch_attention_fn, apply_rotary_emb, _get_qkv_projections


class SemfidFluxAttnProcessor:
    r"""diffusers' ``FluxAttnProcessor``, step for step, with semfid's ops when maps are asked for.

    Built with no arguments (diffusers' ``type(old)()`` in ``load_ip_adapter`` / ``unload_ip_adapter``)
    it belongs to no controller and runs ``FluxAttnProcessor``'s math; the next ``with`` block swaps in
    one of its own. A deep copy is a ``FluxAttnProcessor`` with the same attention backend
    (``copy.deepcopy`` of an installed model is stock).

    Args:
        name (`str`, *optional*): the layer name; owner (*optional*): the controller's identity
            token; active (`bool`): this layer may capture maps (never without an owner).
        single (`bool`): a single-stream block's layer (text length from ``semfid_text_len``).
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, name: Optional[str] = None, owner: object = None, active: bool = False,
                 single: bool = False):
        self.name = name
        self.owner = owner
        self.active = bool(active) and owner is not None
        self.single = bool(single)

    def __repr__(self) -> str:
        return f"SemfidFluxAttnProcessor(name={self.name!r}, active={self.active}, single={self.single})"

    def stock(self, memo: Optional[dict] = None):
        """The ``FluxAttnProcessor`` this processor stands in for, with its attention backend
        (``uninstall``: shared; inside ``copy.deepcopy`` (``memo``): copied)."""
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        stock = FluxAttnProcessor()
        for attr in ("_attention_backend", "_parallel_config"):
            if getattr(self, attr, None) is not None:
                value = getattr(self, attr)
                setattr(stock, attr, copy.deepcopy(value, memo) if memo is not None else value)
        return stock

    def __deepcopy__(self, memo):
        return self.stock(memo)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb=None,
        semfid_call: Optional[CallStateProtocol] = None,
        semfid_text_len: Optional[int] = None,
        semfid_ref_record: Optional[ReferenceRecord] = None,
        semfid_ref_keys: Optional[Dict[str, torch.Tensor]] = None,
    ):
        r"""Run the Flux attention layer.

        Args:
            attn (`FluxAttention`): the diffusers module owning this processor.
            hidden_states (`torch.Tensor` [B, N, C]): image stream (double) or ``[text, image]``
                (single).
            encoder_hidden_states (`torch.Tensor` [B, M, C], *optional*): text stream (double).
            attention_mask (*optional*): passed on as ``FluxAttnProcessor`` does.
            image_rotary_emb (*optional*): RoPE ``(cos, sin)`` over ``[text, image]``.
            semfid_call, semfid_text_len, semfid_ref_record, semfid_ref_keys (*optional*): per-call
                state from ``joint_attention_kwargs`` (plans; the text length for single-stream
                layers; the reference pass's key record; the loss pass's reference keys).

        Returns:
            `(image, text)` outputs for a double-stream layer, the joint output for a single-stream one.
        """
        dispatch_attention_fn, apply_rotary_emb, get_qkv = _flux_parts()
        plan = layer_plan(self.name, self.owner, self.active, semfid_call)
        query, key, value, encoder_query, encoder_key, encoder_value = get_qkv(
            attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        text_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else semfid_text_len
        if semfid_ref_record is not None and text_len is not None:
            semfid_ref_record.put(self.name, self.owner, key[:, :int(text_len)].transpose(1, 2))
        if plan is None or not plan.wants_maps:
            hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                                  backend=self._attention_backend,
                                                  parallel_config=self._parallel_config)
        else:
            if text_len is None:
                raise RuntimeError(f"layer {self.name}: a single-stream block was asked for maps but the "
                                   f"call carries no '{TEXT_LEN_KWARG}' (call the model, not the block)")
            out = joint_attention(self.name, query.transpose(1, 2), key.transpose(1, 2),
                                  value.transpose(1, 2), scale=attn.head_dim ** -0.5,
                                  attn_bias=_additive_bias(attention_mask), plan=plan, call=semfid_call,
                                  text=(0, int(text_len)), image=(int(text_len), query.shape[1]),
                                  ref_keys=semfid_ref_keys)
            hidden_states = out.transpose(1, 2)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]],
                dim=1)
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


class FluxFamily(Family):
    """``FluxTransformer2DModel``: every double- and single-stream attention attends to the text."""

    name = "flux"
    latent_arg = "hidden_states"
    kwargs_arg = "joint_attention_kwargs"
    replaceable = ("FluxAttnProcessor", "SemfidFluxAttnProcessor")
    joint = True

    def __init__(self, model: torch.nn.Module):
        self._text_width = int(model.context_embedder.in_features)
        self._single = {f"{name}.attn" for name, m in model.named_modules()
                        if type(m).__name__ == "FluxSingleTransformerBlock"}

    def text_layers(self, modules):
        return {n: m for n, m in modules.items()
                if getattr(m, "added_kv_proj_dim", None) is not None or n in self._single}

    def make_processor(self, name, module, owner, active):
        proc = SemfidFluxAttnProcessor(name, owner, active=active, single=name in self._single)
        old = module.processor
        for attr in ("_attention_backend", "_parallel_config"):  # set_attention_backend before install
            if getattr(old, attr, None) is not None:
                setattr(proc, attr, getattr(old, attr))
        return proc

    def grids(self, get: ArgGetter, names):
        ids = get("img_ids")
        grid = None
        # Reading the grid off img_ids is a host sync, a data-dependent graph break under
        # torch.compile: traced calls leave it to the recorder, which infers square grids.
        if torch.compiler.is_compiling():
            return {n: None for n in names}
        if isinstance(ids, torch.Tensor) and ids.shape[-1] == 3 and ids.numel():
            ids = ids.reshape(-1, 3)
            grid = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)  # one host sync per call
            if grid[0] * grid[1] != ids.shape[0]:
                grid = None
        return {n: grid for n in names}

    def call_kwargs(self, get: ArgGetter):
        ehs = get("encoder_hidden_states")
        return self.text_len_kwargs(ehs.shape[1]) if isinstance(ehs, torch.Tensor) and ehs.dim() == 3 else {}

    def text_len_kwargs(self, text_len: int):
        return {TEXT_LEN_KWARG: int(text_len)}

    def reference_call(self, call, ref_len: int):
        txt_ids = call.get("txt_ids")
        if isinstance(txt_ids, torch.Tensor) and txt_ids.shape[-2] == ref_len:
            return {}
        device = txt_ids.device if isinstance(txt_ids, torch.Tensor) else None
        return {"txt_ids": torch.zeros(ref_len, 3, device=device)}  # Flux pipelines' text ids

    def key_width(self, module):  # reference prompts come in as the model's encoder_hidden_states
        return self._text_width

    value_width = key_width


__all__ = ["SemfidFluxAttnProcessor", "FluxFamily", "TEXT_LEN_KWARG"]
