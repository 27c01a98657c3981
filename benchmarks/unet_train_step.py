"""The UNet side of ``benchmarks/train_step.py``: the SD1.5 / SDXL model, a step's inputs, and the
explicit-softmax baseline (``dit_train_step.py`` is the same for the Flux / SD3 transformers).

The baseline, :class:`ExplicitSoftmaxStoreProcessor`, is how attention-map training code gets its
maps today (Prompt-to-Prompt's AttentionStore / FastComposer style): an explicit ``softmax(QKᵀ)`` in
every cross-attention layer, the selected columns stored per layer and the loss computed from them
after the UNet call.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from baselines import eager_head_mean_maps, eager_probabilities, subject_loss


# ------------------------------------------------------------------------------------------------
# model and inputs
# ------------------------------------------------------------------------------------------------
def build_unet(config_name: str, device: torch.device, dtype: torch.dtype):
    """A frozen, randomly initialised UNet from a config shipped with semfid (created on ``device``
    directly: a 2.6 B-parameter SDXL initialises in seconds on a GPU, minutes on a CPU)."""
    from semfid.testing.unets import load_unet_config
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel.from_config(load_unet_config(config_name))
    if dtype != torch.float32:
        unet = unet.to(dtype=dtype)
    return unet.requires_grad_(False).eval()


def unet_step_fields(unet, batch: int, latent: int, device, dtype, seed: int = 0) -> dict:
    r"""The tensors of one training step of ``unet`` at a ``latent`` × ``latent`` latent.

    Returns:
        `dict`: ``sample`` [B, C, latent, latent], ``timestep`` [B], ``key_states`` [B, 77, C_text]
        (the trained text states: a leaf that requires grad), ``reference_states`` (same shape, the
        reference prompt), ``noise`` (the target) and ``added_cond`` (SDXL's pooled text embeds and
        size / crop ids, else None).
    """
    cfg = unet.config
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    added = None
    if cfg.addition_embed_type == "text_time":  # SDXL: pooled text embeds + 6 size/crop ids
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": randn(batch, text_dim),
                 "time_ids": torch.tensor([latent * 8, latent * 8, 0, 0, latent * 8, latent * 8],
                                          device=device, dtype=dtype).repeat(batch, 1)}
    return dict(
        sample=randn(batch, cfg.in_channels, latent, latent),
        timestep=torch.randint(0, 1000, (batch,), generator=gen).to(device),
        key_states=randn(batch, 77, cfg.cross_attention_dim).requires_grad_(True),
        reference_states=randn(batch, 77, cfg.cross_attention_dim),
        noise=randn(batch, cfg.out_channels, latent, latent),
        added_cond=added,
    )


# ------------------------------------------------------------------------------------------------
# the explicit-softmax baseline processor
# ------------------------------------------------------------------------------------------------
class MapStore:
    """Per-step state of the explicit baseline: what to compare, and the maps stored per layer."""

    def __init__(self) -> None:
        self.tokens: Optional[torch.Tensor] = None
        self.reference_states: Optional[torch.Tensor] = None
        self.maps: Dict[str, tuple] = {}  # layer name -> (A_t, A_r)

    def loss(self) -> torch.Tensor:
        """Mean over the layers of the per-layer subject loss, [B]."""
        losses = [subject_loss(a_t, a_r) for a_t, a_r in self.maps.values()]
        return torch.stack(losses).mean(dim=0)


class ExplicitSoftmaxStoreProcessor:
    r"""Cross-attention with an explicit ``softmax(QKᵀ)`` whose selected columns are stored.

    The ``AttnProcessor2_0`` template, with the SDPA call replaced by :func:`baselines.eager_probabilities`
    (the way attention-map training code gets maps today). When ``store.tokens`` is set, the
    head-mean maps of those tokens (``A_t``) and, without gradient, those of the reference keys
    ``to_k(store.reference_states)`` (``A_r``) are kept in ``store.maps[name]``.

    Args:
        store (`MapStore`): shared by every layer of the UNet.
        name (`str`): the layer name (processor key without ``.processor``).
    """

    def __init__(self, store: MapStore, name: str) -> None:
        self.store, self.name = store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        if attention_mask is not None:
            raise ValueError("this benchmark baseline takes no attention mask")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(t):
            return t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        probs = eager_probabilities(query, key, attn.scale)
        hidden_states = torch.matmul(probs, value)
        if self.store.tokens is not None:
            maps_t = eager_head_mean_maps(probs, self.store.tokens)
            with torch.no_grad():
                key_ref = heads(attn.to_k(self.store.reference_states))
                maps_r = eager_head_mean_maps(eager_probabilities(query, key_ref, attn.scale),
                                              self.store.tokens)
            self.store.maps[self.name] = (maps_t, maps_r)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.to(query.dtype)))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
