"""The diffusion-transformer side of ``benchmarks/train_step.py``: the Flux.1-dev and SD3.5-medium steps.

``python benchmarks/train_step.py --models flux sd3`` runs the same step as for the UNets (denoising
MSE + 0.003 · subject loss on 10 text tokens in every layer whose keys include the text, gradients
to the text states, the transformer frozen), the same variants, interleaved rounds, table and JSON.
What differs for a DiT lives here:

* the models: the Flux.1-dev twin (19 double + 38 single-stream blocks) and the SD3.5-medium twin
  (24 joint blocks, 13 image-only ``attn2``), or the full-size configs with random weights;
* the inputs of one call (latents at ``res`` px: a ``res/16`` × ``res/16`` patch grid; Flux's
  packed latents, ids and guidance; SD3's pooled projections) and the text lengths of the real
  pipelines (Flux.1-dev: 512 T5 tokens; SD3: 77 CLIP + 256 T5);
* the stock processors the ``floor`` variant runs (``FluxAttnProcessor``, ``JointAttnProcessor2_0``);
* the ``explicit`` baseline: semfid's processors with the same no-grad reference forward, but in
  each joint layer a full softmax over the joint key set for the target ([B, H, N, M], kept for
  backward) and one without gradient for the reference key set, the maps taken from them
  (:func:`explicit_joint_attention`, in place of :func:`semfid.diffusers.families.joint.joint_attention`).
"""

from __future__ import annotations

import contextlib
from typing import Dict, Optional

import torch

from baselines import eager_head_mean_maps, eager_probabilities, subject_loss

#: model → (full-size config, structural twin, pixel resolution of the full-size run)
DIT_MODELS = {
    "flux": ("flux_dev_transformer", "flux_dev_transformer_twin", 1024),
    "sd3": ("sd35_medium_transformer", "sd35_medium_transformer_twin", 1024),
}
#: pixel resolution of a twin's run (SD3.5 twin: ``pos_embed_max_size`` 16 patches = 256 px)
TWIN_RES = 256
#: text tokens of one call: Flux.1-dev's max_sequence_length, SD3's 77 CLIP + 256 T5 keys
TEXT_LEN = {"FluxTransformer2DModel": 512, "SD3Transformer2DModel": 77 + 256}


def is_dit(model: torch.nn.Module) -> bool:
    """Whether ``model`` is one of the transformers this module runs."""
    return type(model).__name__ in TEXT_LEN


def build_dit(config_name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen, randomly initialised transformer from a config shipped with semfid (built on
    ``device`` directly)."""
    from semfid.testing.dits import dit_from_config

    with torch.device(device):
        model = dit_from_config(config_name)
    if dtype != torch.float32:
        model = model.to(dtype=dtype)
    return model.requires_grad_(False).eval()


def stock_processor(model: torch.nn.Module):
    """The processor diffusers builds the model's attention layers with (what ``floor`` runs)."""
    from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    kind = type(model).__name__
    if kind == "FluxTransformer2DModel":
        return FluxAttnProcessor()
    if kind == "SD3Transformer2DModel":
        return JointAttnProcessor2_0()
    return AttnProcessor2_0()


def dit_step_fields(model: torch.nn.Module, batch: int, latent: int, device, dtype, seed: int = 0) -> dict:
    r"""The tensors of one training step of ``model`` at a ``latent`` × ``latent`` latent.

    Returns:
        `dict`: ``sample`` (SD3: [B, C, latent, latent]; Flux: packed [B, (latent/2)², C]),
        ``timestep`` [B], ``key_states`` [B, M, C_text] (the trained text states: a leaf that
        requires grad), ``reference_states`` (same shape, the reference prompt), ``noise`` (the
        target, shaped as the prediction) and ``dit_kwargs`` (the call's other arguments).
    """
    cfg = model.config
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    side = latent // 2  # the patch grid: 2 × 2 latent pixels per token (SD3 patch 2, Flux packing)
    text, width = TEXT_LEN[type(model).__name__], model.context_embedder.in_features
    t = torch.rand(batch, generator=gen).to(device=device, dtype=dtype)
    fields = dict(key_states=randn(batch, text, width).requires_grad_(True),
                  reference_states=randn(batch, text, width))
    if type(model).__name__ == "FluxTransformer2DModel":
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
        out_channels = cfg.out_channels or cfg.in_channels
        kwargs = dict(pooled_projections=randn(batch, cfg.pooled_projection_dim),
                      img_ids=img_ids.to(device=device, dtype=dtype),
                      txt_ids=torch.zeros(text, 3, device=device, dtype=dtype))
        if cfg.guidance_embeds:
            kwargs["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
        return dict(fields, sample=randn(batch, side * side, cfg.in_channels), timestep=t,
                    noise=randn(batch, side * side, out_channels), dit_kwargs=kwargs)
    return dict(fields, sample=randn(batch, cfg.in_channels, latent, latent), timestep=t * 1000,
                noise=randn(batch, cfg.out_channels, latent, latent),
                dit_kwargs=dict(pooled_projections=randn(batch, cfg.pooled_projection_dim)))


def dit_prediction(model: torch.nn.Module, x) -> torch.Tensor:
    """The model's prediction for the step inputs ``x`` (``train_step.StepInputs``)."""
    return model(hidden_states=x.sample, timestep=x.timestep, encoder_hidden_states=x.key_states,
                 **x.dit_kwargs).sample


def explicit_joint_attention(name, query, key, value, *, scale, attn_bias, plan, call, text, image,
                             ref_keys: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
    """The explicit baseline in :func:`~semfid.diffusers.families.joint.joint_attention`'s place:
    full softmaxes over the joint key sets of the target and (no grad) the reference."""
    from semfid.diffusers.families.reference import reference_for

    item = plan.loss
    if item is None or attn_bias is not None or item.tokens.ragged or item.keep_maps:
        raise ValueError(f"layer {name}: the explicit baseline runs only this benchmark's loss "
                         "(one token list for every row, no mask, no kept maps)")
    k_ref = reference_for(name, ref_keys, query.shape[0])
    rows = slice(*image)
    p_t = eager_probabilities(query, key, scale)  # [B, H, N, M]
    maps_t = eager_head_mean_maps(p_t[:, :, rows], item.tokens.index[0] + text[0])
    with torch.no_grad():
        k_r = torch.cat([key[:, :, :text[0]], k_ref, key[:, :, text[1]:]], dim=2)
        p_r = eager_probabilities(query, k_r, scale)
        maps_r = eager_head_mean_maps(p_r[:, :, rows], item.ref_tokens.index[0] + text[0])
    call.record(item, name, subject_loss(maps_t, maps_r), None)
    return torch.matmul(p_t, value)


@contextlib.contextmanager
def explicit_joint(model: torch.nn.Module):
    """Inside: the installed processors of ``model`` (Flux or SD3) take their maps and loss from
    :func:`explicit_joint_attention` (the name their family module calls is swapped, then restored)."""
    from semfid.diffusers.families import flux, sd3

    module = flux if type(model).__name__ == "FluxTransformer2DModel" else sd3
    stock = module.joint_attention
    module.joint_attention = explicit_joint_attention
    try:
        yield
    finally:
        module.joint_attention = stock


__all__ = ["DIT_MODELS", "TWIN_RES", "TEXT_LEN", "is_dit", "build_dit", "stock_processor", "dit_step_fields",
           "dit_prediction", "explicit_joint_attention", "explicit_joint"]
