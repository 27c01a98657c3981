"""semfid on the SD3 / SD3.5, Flux.1 and PixArt-Σ twins: stock equality with no block active, and
captured maps against an explicit float64 softmax of the stock model's own queries and keys."""

from __future__ import annotations

import pytest
import torch

from semfid.diffusers import install
from semfid.diffusers.families.flux import SemfidFluxAttnProcessor

from _dit_calls import make_call, twin

FAMILIES = ("sd3", "flux", "pixart")


def _stock_qk(model, kw):
    """Every SDPA call of a stock run, as {layer name: (q, k)} ([B, H, N, D] each)."""
    names = {m: n for n, m in model.named_modules() if hasattr(m, "set_processor")}
    current, seen = [None], {}
    hooks = [m.register_forward_pre_hook(lambda m, a: current.__setitem__(0, names[m])) for m in names]
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, *args, **kwargs):  # diffusers passes them by name too
        seen[current[0]] = (query.detach(), key.detach())
        return sdpa(query, key, value, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = recording
    try:
        with torch.no_grad():
            out = model(**kw).sample
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        for h in hooks:
            h.remove()
    return out, seen


def _reference_maps(family, q, k, tokens, n_img, text_len):
    """P[image queries, text tokens] of one layer from an explicit float64 softmax over all keys."""
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    tokens = torch.tensor(tokens)
    if family == "sd3":  # keys [image, text]
        return p[:, :, :n_img, n_img + tokens]
    if family == "flux":  # keys [text, image]
        return p[:, :, text_len:, tokens]
    return p[..., tokens]  # PixArt attn2: the text alone


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_stock_output_and_maps_match_explicit_softmax(family):
    model = twin(family)
    kw = make_call(family, batch=2, text=7, h=4, w=6)
    ref, qk = _stock_qk(model, kw)
    ctl = install(model)
    with torch.no_grad():
        plain = model(**kw).sample
        with ctl.capture([1, 4, 6], head_reduce="none") as rec:
            mapped = model(**kw).sample
    scale = ref.abs().max()
    assert (plain - ref).abs().max() <= 1e-5 * scale  # no block active: the stock output
    assert (mapped - ref).abs().max() <= 1e-5 * scale
    assert set(rec.maps) == set(ctl.cross_attention_layers) == set(ctl.layers)
    expected_layers = {"sd3": 24, "flux": 57, "pixart": 28}[family]  # SD3.5 medium's attn2: no text
    assert len(rec.maps) == expected_layers
    for name, maps in rec.maps.items():
        want = _reference_maps(family, *qk[name], [1, 4, 6], n_img=24, text_len=7)
        assert maps.shape == (2, 2, 24, 3), name
        assert (maps.double() - want).abs().max() < 2e-6, name
    assert rec.resolutions == [(4, 6)]
    heat = rec.aggregate((4, 6))
    assert heat.shape == (2, 3, 4, 6)
    ctl.uninstall()


@pytest.mark.slow
def test_flux_single_and_double_blocks_and_the_attention_backend():
    model = twin("flux")
    model.set_attention_backend("_native_math")  # before install: kept by semfid's processors
    kw = make_call("flux", batch=1, text=5, h=3, w=2)
    with torch.no_grad():
        ref = model(**kw).sample
        ctl = install(model)
        out = model(**kw).sample
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    procs = model.attn_processors
    single = [n for n in ctl.layers if n.startswith("single_transformer_blocks")]
    double = [n for n in ctl.layers if n.startswith("transformer_blocks")]
    assert len(single) == 38 and len(double) == 19
    assert all(isinstance(p, SemfidFluxAttnProcessor) for p in procs.values())
    assert all(procs[n + ".processor"].single for n in single)
    assert all(p._attention_backend.value == "_native_math" for p in procs.values())
    model.set_attention_backend("native")  # after install: reaches them too
    assert all(p._attention_backend.value == "native" for p in model.attn_processors.values())
    ctl.uninstall()


def test_install_names_what_is_supported():
    with pytest.raises(ValueError, match="supports UNet2DConditionModel.*FluxTransformer2DModel.*got Linear"):
        install(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="must be a diffusers model"):
        install("unet")


def test_sd3_refuses_processors_it_cannot_reproduce():
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    class Custom(JointAttnProcessor2_0):
        pass

    model = twin("sd3")
    key = next(iter(model.attn_processors))
    model.set_attn_processor({**dict(model.attn_processors), key: Custom()})
    with pytest.raises(ValueError, match="cannot stand in for.*Custom.*JointAttnProcessor2_0"):
        install(model)


@pytest.mark.slow
def test_semfid_losses_work_on_dit_maps():
    from semfid.losses import balanced_l1_loss, mask_mse_loss, max_attention_loss

    model = twin("flux")
    kw = make_call("flux", batch=1, text=5, h=4, w=4)
    ctl = install(model, layers=lambda n: n.endswith((".0.attn", ".1.attn")))  # double and single
    with ctl.capture([1, 2]) as rec:
        model(**kw)
    masks = torch.rand(1, 2, 8, 8)
    losses = [mask_mse_loss(rec, masks), balanced_l1_loss(rec, masks), max_attention_loss(rec, [0], res=4)]
    sum(loss.sum() for loss in losses).backward()
    assert all(loss.shape == (1,) and torch.isfinite(loss).all() for loss in losses)
    for block in (model.transformer_blocks[0], model.single_transformer_blocks[1]):
        assert block.attn.to_q.weight.grad.abs().sum() > 0
    ctl.uninstall()


def test_replaced_processor_is_named_at_block_entry():
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    class Custom(JointAttnProcessor2_0):
        pass

    model = twin("sd3")
    ctl = install(model)
    name = ctl.layers[3]
    model.get_submodule(name).set_processor(Custom())
    with pytest.raises(RuntimeError, match=f"{name}.*Custom"):
        with ctl.capture([1]):
            pass


@pytest.mark.parametrize("family,count,kinds", [
    ("sd3", 24, {"transformer_blocks"}),
    ("flux", 19 + 38, {"transformer_blocks", "single_transformer_blocks"}),
    ("pixart", 28, {"transformer_blocks"}),
])
def test_public_cross_attention_layers_on_every_family(family, count, kinds):
    """semfid.diffusers.cross_attention_layers gives the layers whose keys include the text, the
    names install() chooses from (SD3.5 medium's image-only attn2 left out)."""
    from semfid.diffusers import cross_attention_layers

    model = twin(family)
    layers = cross_attention_layers(model)
    names = list(layers)
    assert len(names) == count and {n.split(".")[0] for n in names} == kinds
    assert all(layers[n] is model.get_submodule(n) for n in names)
    assert all(n + ".processor" in model.attn_processors for n in names)
    if family == "sd3":
        assert any(k.endswith("attn2.processor") for k in model.attn_processors)
        assert all(n.endswith(".attn") for n in names)
    ctl = install(model)
    assert ctl.cross_attention_layers == names
    ctl.uninstall()
    with pytest.raises(ValueError, match="supports UNet2DConditionModel"):
        cross_attention_layers(torch.nn.Linear(2, 2))


def _dit_ip_processor(family, module):
    """diffusers' IP-Adapter processor of ``family`` for the attention ``module`` (what
    ``load_ip_adapter`` puts on a double-stream / joint layer)."""
    inner = module.to_q.out_features
    if family == "flux":
        from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

        return FluxIPAdapterAttnProcessor(inner, 24, num_tokens=(4,))
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0

    return SD3IPAdapterJointAttnProcessor2_0(inner, 24, inner // module.heads, timesteps_emb_dim=16)


@pytest.mark.parametrize("family,cls", [("sd3", "SD3IPAdapterJointAttnProcessor2_0"),
                                        ("flux", "FluxIPAdapterAttnProcessor")])
def test_dit_ip_adapter_processors_are_refused_by_name(family, cls):
    """semfid does not stand in for SD3's / Flux's IP-Adapter processors: install() on a model
    carrying one, and a block whose layers hold one (load_ip_adapter after install), stop with an
    error naming the layer, the class and what to do; a block on the other layers is accepted."""
    model = twin(family)
    name = "transformer_blocks.2.attn"
    module = model.get_submodule(name)
    stock = module.processor
    module.set_processor(_dit_ip_processor(family, module))
    with pytest.raises(ValueError, match=f"{name}: {cls}.*does not stand in for.*unload_ip_adapter"):
        install(model)
    module.set_processor(stock)
    ctl = install(model)
    module.set_processor(_dit_ip_processor(family, module))
    with pytest.raises(RuntimeError, match=f"{name}: {cls}.*unload_ip_adapter"):
        with ctl.capture([1]):
            pass
    with ctl.capture([1], layers=lambda n: n != name):  # (calling it needs the adapter's image embeds)
        pass
    ctl.uninstall()
    assert type(module.processor).__name__ == cls  # someone else's processor stays
