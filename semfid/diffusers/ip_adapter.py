"""IP-Adapter with semfid: diffusers' ``IPAdapterAttnProcessor2_0`` whose text branch is semfid's.

An IP-Adapter (plain, Plus, FaceID, ...; one or more at once) adds to every cross-attention layer a
second attention over image-prompt tokens: with ``q`` the layer's query,

    out = SDPA(q, to_k(text), to_v(text)) + Σ_i scale_i · [mask_i ·] SDPA(q, to_k_ip[i](img_i), to_v_ip[i](img_i))

(``IPAdapterAttnProcessor2_0.__call__`` in diffusers). The text attention and each image attention
are separate softmaxes, so the maps of the text tokens are exactly those of the plain text attention
and semfid's capture / subject loss apply to the text branch unchanged. The image attentions'
own maps (which image-prompt tokens a region attends to) are recorded on request,
``capture(..., ip_tokens=...)`` (:mod:`semfid.diffusers.ip_maps`).

:class:`SemfidIPAdapterAttnProcessor` is a subclass of ``IPAdapterAttnProcessor2_0`` (so
``set_ip_adapter_scale`` and ``unload_ip_adapter`` treat it as theirs) that shares the adapter's
``to_k_ip`` / ``to_v_ip`` modules (same parameters, same state-dict keys). Its text branch is
:class:`~semfid.diffusers.processors.SemfidAttnProcessor`'s (SDPA, or semfid's fused ops when the
layer is asked for maps or the loss); its image branch is diffusers' step for step: per adapter
(skipped when its scale is 0), per image when masks are given (resized with
``IPAdapterMaskProcessor.downsample``), added to the merged-head output before ``to_out``.
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch
import torch.nn.functional as F
from diffusers.image_processor import IPAdapterMaskProcessor
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

from . import ip_maps
from .processors import SemfidAttnProcessor, _epilogue, _split_heads


def _ip_scales(scale) -> List[float]:
    return scale if isinstance(scale, list) else [scale]


def _check_masks(masks, scales, ip_states) -> list:
    """diffusers' checks of ``ip_adapter_masks`` (same messages); one entry per adapter."""
    if masks is None:
        return [None] * len(scales)
    if not isinstance(masks, list):  # diffusers' backward compatibility: [num_adapters, 1, h, w]
        masks = list(masks.unsqueeze(1))
    if not (len(masks) == len(scales) == len(ip_states)):
        raise ValueError(
            f"Length of ip_adapter_masks array ({len(masks)}) must match length of self.scale array "
            f"({len(scales)}) and number of ip_hidden_states ({len(ip_states)})"
        )
    for index, (mask, scale, ip_state) in enumerate(zip(masks, scales, ip_states)):
        if mask is None:
            continue
        if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
            raise ValueError(
                "Each element of the ip_adapter_masks array should be a tensor with shape "
                "[1, num_images_for_ip_adapter, height, width]. Please use `IPAdapterMaskProcessor` "
                "to preprocess your mask"
            )
        if mask.shape[1] != ip_state.shape[1]:
            raise ValueError(f"Number of masks ({mask.shape[1]}) does not match number of ip images "
                             f"({ip_state.shape[1]}) at index {index}")
        if isinstance(scale, list) and not len(scale) == mask.shape[1]:
            raise ValueError(f"Number of masks ({mask.shape[1]}) does not match number of scales "
                             f"({len(scale)}) at index {index}")
    return masks


class SemfidIPAdapterAttnProcessor(IPAdapterAttnProcessor2_0, SemfidAttnProcessor):
    r"""``IPAdapterAttnProcessor2_0`` with semfid's text branch (maps / subject loss on request).

    Built by the controller from a loaded ``IPAdapterAttnProcessor2_0`` with :meth:`adopt` (at
    ``install()`` or at the first ``with`` block after ``load_ip_adapter``); with no block active its
    output equals the stock processor's.

    Args:
        hidden_size, cross_attention_dim, num_tokens, scale: as ``IPAdapterAttnProcessor2_0``.
        name, owner, active: as :class:`~semfid.diffusers.processors.SemfidAttnProcessor`.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: Optional[int] = None, num_tokens=(4,),
                 scale=1.0, name: Optional[str] = None, owner: Any = None, active: bool = False):
        IPAdapterAttnProcessor2_0.__init__(self, hidden_size, cross_attention_dim, num_tokens, scale)
        SemfidAttnProcessor.__init__(self, name, owner, active)

    @classmethod
    def adopt(cls, stock: IPAdapterAttnProcessor2_0, name: Optional[str] = None, owner: Any = None,
              active: bool = False) -> "SemfidIPAdapterAttnProcessor":
        """A semfid processor sharing ``stock``'s ``to_k_ip`` / ``to_v_ip`` modules and scale list."""
        with torch.device("meta"):  # the adapter's own Linear layers replace these at once
            new = cls(stock.hidden_size, stock.cross_attention_dim, list(stock.num_tokens), 1.0,
                      name, owner, active)
        new.to_k_ip, new.to_v_ip = stock.to_k_ip, stock.to_v_ip
        new.scale = stock.scale
        new.train(stock.training)
        return new

    def __repr__(self) -> str:
        return (f"SemfidIPAdapterAttnProcessor(name={self.name!r}, active={self.active}, "
                f"num_tokens={list(self.num_tokens)}, scale={self.scale})")

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states=None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        scale: float = 1.0,
        ip_adapter_masks=None,
        semfid_call=None,
    ) -> torch.Tensor:
        r"""Run the attention layer with its image-prompt branch.

        Args:
            encoder_hidden_states (`tuple`): ``(text_states [B, M, C], [ip_states_i [B, n_img, T_i, C]])``
                as the UNet builds it from ``added_cond_kwargs["image_embeds"]`` (a plain tensor ending in
                ``num_tokens[0]`` image tokens is split as diffusers does).
            scale (`float`): unused (diffusers' LoRA scale argument, kept so it is not warned about).
            ip_adapter_masks (*optional*): per adapter [1, n_img, h, w] masks (``IPAdapterMaskProcessor``).
            Others as :meth:`SemfidAttnProcessor.__call__`.

        Returns:
            `torch.Tensor` shaped like ``hidden_states``.
        """
        ip_states = None
        if encoder_hidden_states is not None:
            if isinstance(encoder_hidden_states, tuple):
                encoder_hidden_states, ip_states = encoder_hidden_states
            else:  # diffusers' deprecated form: image tokens appended to the text tokens
                end = encoder_hidden_states.shape[1] - self.num_tokens[0]
                encoder_hidden_states, ip_states = (encoder_hidden_states[:, :end],
                                                    [encoder_hidden_states[:, end:]])
        out, query, pro, plan = self._attend(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                             semfid_call)
        if ip_states is not None:
            out = self._image_branch(attn, query, out, ip_states, ip_adapter_masks, plan)
        return _epilogue(attn, out, query.dtype, pro)

    def _image_branch(self, attn, query, out, ip_states, masks, plan=None):
        """Add ``scale · [mask ·] SDPA(q, to_k_ip(img), to_v_ip(img))`` per adapter, as diffusers does.

        ``out`` / ``query`` are [B, H, N, D]; diffusers adds in the merged [B, N, H·D] layout, which
        holds the same elements (the sums are bit-identical). An adapter whose image-prompt maps a
        capture asks for (``plan.ip_captures``, :mod:`semfid.diffusers.ip_maps`) runs through
        :func:`semfid.cross_attention` with ``select`` (output and maps from one pass), and through
        :func:`semfid.attention_maps` alone when its scale is 0 (diffusers skips its output).
        """
        batch, heads, _, head_dim = query.shape
        masks = _check_masks(masks, self.scale, ip_states)
        for adapter, (states, scale, to_k_ip, to_v_ip, mask) in enumerate(
                zip(ip_states, self.scale, self.to_k_ip, self.to_v_ip, masks)):
            want = ip_maps.wanted(plan, adapter)
            skip = all(s == 0 for s in _ip_scales(scale))
            if skip and not want:
                continue
            per_image = states.shape[-2]  # the adapter's tokens per image (num_tokens)
            if mask is None:
                key = _split_heads(to_k_ip(states), batch, heads, head_dim)
                value = _split_heads(to_v_ip(states), batch, heads, head_dim)
                ip_out = ip_maps.unmasked(self.name, adapter, query, key, value, want, per_image, not skip)
                if not skip:
                    out = out + scale * ip_out.to(query.dtype)
                continue
            scales = scale if isinstance(scale, list) else [scale] * mask.shape[1]
            selects = ip_maps.per_image_selects(want, query, per_image)
            image_maps = []
            for i in range(mask.shape[1]):
                key = _split_heads(to_k_ip(states[:, i]), batch, heads, head_dim)
                value = _split_heads(to_v_ip(states[:, i]), batch, heads, head_dim)
                ip_out, maps = ip_maps.attend(query, key, value, selects, not skip)
                image_maps.append(maps)
                if skip:
                    continue
                ip_out = ip_out.to(query.dtype)
                n_query = ip_out.shape[2]
                down = IPAdapterMaskProcessor.downsample(mask[:, i], batch, n_query, 1)  # [B, N, 1]
                down = down.to(dtype=query.dtype, device=query.device)
                out = out + scales[i] * (ip_out * down[:, None])
            if want:
                ip_maps.masked(self.name, adapter, want, image_maps, per_image)
        return out

    def __deepcopy__(self, memo):
        from .adoption import stock_equivalent

        return stock_equivalent(self, memo)


__all__ = ["SemfidIPAdapterAttnProcessor"]
