"""semfid.diffusers: drop-in processors on the SD1.5 / SDXL structural twins (CPU).

The twins (semfid/configs/*_twin.json) have the block layout and processor names of the real
UNets (16 / 70 cross-attention layers) with tiny widths. Every numerical check compares against
an independent explicit-softmax processor (tests/_diffusers_ref.py) run on a copy of the same UNet,
in float64 so that a wrong index, scale, mask or missing term cannot hide inside a tolerance.
"""

from __future__ import annotations

import copy
import logging
import threading

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor

from semfid.diffusers import (
    AttentionRecorder,
    NoCallError,
    SemfidAttnProcessor,
    SubjectLossRecorder,
    cross_attention_layers,
    install,
)
from semfid.testing.unets import load_unet_config, unet_from_config

from _diffusers_ref import RefState, install_reference

TWINS = {"sd15": ("sd15_unet_twin", 16), "sdxl": ("sdxl_unet_twin", 70)}
LATENT = 16  # attn2 grids: SD1.5 twin 16/8/4/2, SDXL twin 8/4 (32 where res=16 is needed)
M = 77  # CLIP text length


@pytest.fixture(autouse=True)
def _one_thread(request):
    """The twins' tensors are tiny: one intra-op thread is faster, above all on a shared machine."""
    threads = torch.get_num_threads()
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
_BASES = {}


def base_unet(kind: str):
    if kind not in _BASES:
        torch.manual_seed(1234)
        _BASES[kind] = unet_from_config(TWINS[kind][0]).eval()
    return _BASES[kind]


def fresh_unet(kind: str, dtype=torch.float32):
    return copy.deepcopy(base_unet(kind)).to(dtype)


def text_width(unet) -> int:
    return unet.config.cross_attention_dim


def make_call(unet, B=2, M=M, dtype=torch.float32, latent=LATENT):
    """(args, kwargs) of a UNet call with random inputs; SDXL gets its added_cond_kwargs."""
    sample = torch.randn(B, 4, latent, latent, dtype=dtype)
    ehs = torch.randn(B, M, text_width(unet), dtype=dtype)
    kwargs = {"encoder_hidden_states": ehs}
    if unet.config.addition_embed_type == "text_time":
        n_time = 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(B, unet.config.projection_class_embeddings_input_dim - n_time, dtype=dtype),
            "time_ids": torch.randn(B, 6, dtype=dtype),
        }
    return sample, torch.full((B,), 37), kwargs


def run(unet, sample, t, kwargs, **over):
    kw = dict(kwargs)
    kw.update(over)
    return unet(sample, t, **kw).sample


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def assert_close(a, b, tol, what=""):
    err = rel_err(a, b)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def ref_pair(kind, dtype=torch.float64):
    """Two copies of one twin UNet: ours (to install on) and the reference-processor copy."""
    unet = fresh_unet(kind, dtype)
    ref = copy.deepcopy(unet)
    state = RefState()
    install_reference(ref, state)
    return unet, ref, state


# ------------------------------------------------------------------------------------------------
# configs and layer names
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", TWINS)
def test_shipped_configs_have_twin_structure(kind):
    """The full configs and their twins give the same attn2 layer names (16 / 70)."""
    from diffusers import UNet2DConditionModel

    name, count = TWINS[kind]
    with torch.device("meta"):
        full = UNet2DConditionModel.from_config(load_unet_config(name.replace("_twin", "")))
    twin_names = list(cross_attention_layers(base_unet(kind)))
    assert len(twin_names) == count
    assert list(cross_attention_layers(full)) == twin_names
    assert all(n.endswith("attn2") for n in twin_names)
    with pytest.raises(ValueError, match="name must be one of"):
        load_unet_config("sd21_unet")


# ------------------------------------------------------------------------------------------------
# nothing active: same output as AttnProcessor2_0
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", TWINS)
def test_output_equals_attnprocessor2_0(kind, caplog):
    unet = fresh_unet(kind)
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    sample, t, kw = make_call(unet)
    mask = torch.ones(2, M)
    mask[0, 60:] = 0
    with torch.no_grad():
        before = run(unet, sample, t, kw)
        before_masked = run(unet, sample, t, kw, encoder_attention_mask=mask)
        ctl = install(unet)
        assert all(isinstance(p, SemfidAttnProcessor) for p in unet.attn_processors.values())
        with caplog.at_level(logging.WARNING):
            after = run(unet, sample, t, kw)
            after_masked = run(unet, sample, t, kw, encoder_attention_mask=mask)
            with ctl.capture([1, 2]):  # a block is active: the kwarg must not trigger warnings
                run(unet, sample, t, kw)
    assert_close(after, before, 1e-5, "output")
    assert_close(after_masked, before_masked, 1e-5, "masked output")
    assert rel_err(before_masked, before) > 1e-4  # the mask does something
    assert not [r for r in caplog.records if "not expected" in r.getMessage()]
    ctl.uninstall()


# ------------------------------------------------------------------------------------------------
# capture
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", TWINS)
@pytest.mark.parametrize("head_reduce", ["mean", "none"])
def test_capture_matches_reference(kind, head_reduce):
    unet, ref, state = ref_pair(kind)
    sample, t, kw = make_call(unet, dtype=torch.float64, latent=32)
    tokens = [0, 5, 5, 76]
    state.tokens, state.head_reduce = torch.tensor(tokens), head_reduce
    with torch.no_grad():
        expected = run(ref, sample, t, kw)
        ctl = install(unet)
        with ctl.capture(tokens, head_reduce=head_reduce) as rec:
            got = run(unet, sample, t, kw)
    assert isinstance(rec, AttentionRecorder)
    assert len(rec.maps) == TWINS[kind][1] == len(state.maps)
    assert set(rec.maps) == set(state.maps)
    assert_close(got, expected, 1e-10, "output")
    for name, m in rec.maps.items():
        assert m.dtype == torch.float64 and m.shape == state.maps[name].shape, name
        assert_close(m, state.maps[name], 1e-10, name)
    # aggregate: mean over the layers whose grid is 16x16, as [B, S, 16, 16]
    at16 = [n for n in rec.maps if rec.grids[n] == (16, 16)]
    assert len(at16) == {"sd15": 5, "sdxl": 10}[kind]  # sd15: down_blocks.1 + up_blocks.2
    per_layer = []
    for n in at16:
        m = state.maps[n] if head_reduce == "mean" else state.maps[n].mean(dim=1)
        per_layer.append(m.transpose(1, 2).reshape(2, len(tokens), 16, 16))
    agg = rec.aggregate(res=16)
    assert agg.shape == (2, len(tokens), 16, 16)
    assert_close(agg, torch.stack(per_layer).mean(0), 1e-10, "aggregate(16)")
    assert rec.aggregate(res=(8, 8)).shape == (2, len(tokens), 8, 8)
    with pytest.raises(ValueError, match=r"res=64.*captured grids"):
        rec.aggregate(res=64)
    ctl.uninstall()


def test_capture_grids_follow_the_latent_shape():
    """Non-square latents: each layer's grid is the latent size after its downsamplings."""
    unet = fresh_unet("sd15")
    sample, t, kw = make_call(unet, B=1)
    sample = torch.randn(1, 4, 24, 40)
    ctl = install(unet)
    with torch.no_grad(), ctl.capture([3]) as rec:
        run(unet, sample, t, kw)
    assert {g for g in rec.grids.values()} == {(24, 40), (12, 20), (6, 10), (3, 5)}
    assert rec.grids["mid_block.attentions.0.transformer_blocks.0.attn2"] == (3, 5)
    assert rec.aggregate(res=(12, 20)).shape == (1, 1, 12, 20)
    ctl.uninstall()


def test_capture_is_differentiable_and_per_call():
    unet = fresh_unet("sd15")
    sample, t, kw = make_call(unet, latent=32)
    ehs = kw["encoder_hidden_states"].clone().requires_grad_(True)
    ctl = install(unet)
    with ctl.capture(torch.tensor([[1, 2], [3, 4]])) as rec:
        run(unet, sample, t, kw, encoder_hidden_states=ehs)
        first = dict(rec.maps)
        run(unet, sample + 1, t, kw, encoder_hidden_states=ehs)
    assert rec.num_calls == 2 and len(rec.maps) == 16
    name = next(iter(rec.maps))
    assert rel_err(rec.maps[name], first[name]) > 1e-6  # the later call replaced the maps
    rec.aggregate(res=16).sum().backward()
    assert ehs.grad is not None and ehs.grad.abs().sum() > 0
    ctl.uninstall()


# ------------------------------------------------------------------------------------------------
# subject loss, K/V split, gradients, checkpointing
# ------------------------------------------------------------------------------------------------
def _loss_case(kind, checkpointing, head_reduce="mean", per_layer_values=False):
    unet, ref, state = ref_pair(kind)
    sample, t, kw = make_call(unet, dtype=torch.float64)
    B, C = sample.shape[0], text_width(unet)
    key_states = kw["encoder_hidden_states"]
    reference_states = torch.randn(1, M, C, dtype=torch.float64)
    names = list(cross_attention_layers(unet))
    if per_layer_values:
        value_states = {n: torch.randn(B, M, C, dtype=torch.float64) for n in names[::3]}
        leaves = list(value_states.values())
    else:
        value_states = torch.randn(B, M, C, dtype=torch.float64)
        leaves = [value_states]
    tokens, ref_tokens = [4, 5, 9], [4, 6, 9]
    weight = torch.randn(sample.shape, dtype=torch.float64)

    # reference
    k_ref = key_states.clone().requires_grad_(True)
    v_ref = [v.clone().requires_grad_(True) for v in leaves]
    state.tokens, state.ref_tokens = torch.tensor(tokens), torch.tensor(ref_tokens)
    state.head_reduce, state.reference_states = head_reduce, reference_states
    state.value_states = dict(zip(value_states, v_ref)) if per_layer_values else v_ref[0]
    pred_ref = run(ref, sample, t, kw, encoder_hidden_states=k_ref)
    loss_ref = torch.stack(list(state.losses.values())).mean(0)
    ((pred_ref * weight).sum() + 10.0 * loss_ref.sum()).backward()

    # ours
    if checkpointing:
        unet.enable_gradient_checkpointing()
    ctl = install(unet)
    k_ours = key_states.clone().requires_grad_(True)
    v_ours = [v.clone().requires_grad_(True) for v in leaves]
    vs = dict(zip(value_states, v_ours)) if per_layer_values else v_ours[0]
    with ctl.subject_loss(reference_states, tokens, ref_tokens=ref_tokens, value_states=vs,
                          head_reduce=head_reduce) as rec:
        pred = run(unet, sample, t, kw, encoder_hidden_states=k_ours)
    # backward after the block has exited (checkpoint recompute happens here)
    ((pred * weight).sum() + 10.0 * rec.loss.sum()).backward()
    return dict(pred=pred, pred_ref=pred_ref, rec=rec, state=state, loss_ref=loss_ref,
                k=(k_ours.grad, k_ref.grad), v=[(a.grad, b.grad) for a, b in zip(v_ours, v_ref)],
                unet=unet, ref=ref, ctl=ctl)


@pytest.mark.parametrize("kind", TWINS)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_subject_loss_and_grads_match_reference(kind, checkpointing):
    r = _loss_case(kind, checkpointing)
    rec, state = r["rec"], r["state"]
    assert isinstance(rec, SubjectLossRecorder)
    assert len(rec.layer_losses) == TWINS[kind][1] == len(state.losses)
    assert_close(r["pred"], r["pred_ref"], 1e-10, "output")
    for name, loss in rec.layer_losses.items():
        assert loss.shape == (2,) and loss.dtype == torch.float64
        assert_close(loss, state.losses[name], 1e-9, name)
    assert_close(rec.loss, r["loss_ref"], 1e-9, "loss")
    assert float(rec.loss.detach().min()) > 0
    assert_close(r["k"][0], r["k"][1], 1e-8, "d key_states")
    for i, (g, g_ref) in enumerate(r["v"]):
        assert_close(g, g_ref, 1e-8, f"d value_states[{i}]")
    # a UNet weight feeding the queries of a cross-attention layer
    name = next(iter(rec.layer_losses))
    q_ours = r["unet"].get_submodule(name).to_q.weight.grad
    q_ref = r["ref"].get_submodule(name).to_q.weight.grad
    assert_close(q_ours, q_ref, 1e-8, "d to_q.weight")
    r["ctl"].uninstall()


def test_subject_loss_per_layer_values_and_heads():
    r = _loss_case("sd15", checkpointing=True, head_reduce="none", per_layer_values=True)
    for name, loss in r["rec"].layer_losses.items():
        assert_close(loss, r["state"].losses[name], 1e-9, name)
    assert_close(r["k"][0], r["k"][1], 1e-8, "d key_states")
    for g, g_ref in r["v"]:
        assert_close(g, g_ref, 1e-8, "d value_states")


def test_checkpointing_gives_same_loss_and_grads_as_plain(monkeypatch):
    """fp32 end to end: the checkpoint recompute reproduces the forward exactly."""
    import functools

    calls = []
    original = SemfidAttnProcessor.__call__

    @functools.wraps(original)
    def counting(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if encoder_hidden_states is not None and kwargs.get("semfid_call") is not None:
            calls.append(self.name)
        return original(self, attn, hidden_states, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(SemfidAttnProcessor, "__call__", counting)
    grads = {}
    base_unet("sdxl")  # built (and seeded) once, before the draws below
    for ckpt in (False, True):
        calls.clear()
        torch.manual_seed(7)
        unet = fresh_unet("sdxl")
        if ckpt:
            unet.enable_gradient_checkpointing()
        sample, t, kw = make_call(unet)
        ks = kw["encoder_hidden_states"].clone().requires_grad_(True)
        vs = torch.randn_like(ks, requires_grad=True)
        ref_states = torch.randn(2, M, text_width(unet))
        ctl = install(unet)
        with ctl.subject_loss(ref_states, [2, 3], value_states=vs) as rec:
            pred = run(unet, sample, t, kw, encoder_hidden_states=ks)
        (pred.square().mean() + rec.loss.sum()).backward()
        grads[ckpt] = (rec.loss.detach(), ks.grad, vs.grad)
        assert len(rec.layer_losses) == 70
        # with checkpointing every layer ran again during backward, after the block had exited
        assert len(calls) == (140 if ckpt else 70)
    for a, b, what in zip(grads[False], grads[True], ("loss", "d key_states", "d value_states")):
        assert_close(b, a, 1e-5, what)


@pytest.mark.parametrize("kind", TWINS)
def test_values_feed_to_v_only(kind):
    unet, ref, state = ref_pair(kind)
    sample, t, kw = make_call(unet, dtype=torch.float64)
    vs = torch.randn_like(kw["encoder_hidden_states"])
    state.value_states = vs
    with torch.no_grad():
        expected = run(ref, sample, t, kw)
        ctl = install(unet)
        plain = run(unet, sample, t, kw)
        with ctl.values(vs) as nothing:
            got = run(unet, sample, t, kw)
        with ctl.values(vs), ctl.capture([1]) as rec:  # values and capture nest
            got2 = run(unet, sample, t, kw)
        with ctl.values(vs[:1]):  # batch 1 is shared by the batch
            shared = run(unet, sample, t, kw)
        with ctl.values(vs[:1].expand(2, -1, -1)):
            shared_expanded = run(unet, sample, t, kw)
    assert_close(shared, shared_expanded, 1e-12, "batch-1 value_states")
    assert nothing is None
    assert_close(got, expected, 1e-10, "values output")
    assert_close(got2, expected, 1e-10, "values+capture output")
    assert len(rec.maps) == TWINS[kind][1]
    assert rel_err(got, plain) > 1e-4
    ctl.uninstall()


def test_cfg_batch_with_full_batch_value_states():
    """Under CFG the caller builds the full batch: uncond states in the first half of both."""
    unet, ref, state = ref_pair("sd15")
    sample1, t1, kw1 = make_call(unet, B=1, dtype=torch.float64)
    uncond = torch.randn(1, M, text_width(unet), dtype=torch.float64)
    cond_k = kw1["encoder_hidden_states"]
    cond_v = torch.randn_like(cond_k)
    sample = sample1.expand(2, -1, -1, -1)
    t = t1.expand(2)
    key_states, value_states = torch.cat([uncond, cond_k]), torch.cat([uncond, cond_v])
    tokens = torch.tensor([[0, 1], [4, 5]])  # per-row tokens for the two halves
    state.value_states, state.tokens = value_states, tokens
    with torch.no_grad():
        expected = run(ref, sample, t, {"encoder_hidden_states": key_states})
        expected_maps = dict(state.maps)
        state.value_states = state.tokens = None
        uncond_alone = run(ref, sample1, t1, {"encoder_hidden_states": uncond})
        ctl = install(unet)
        with ctl.values(value_states), ctl.capture(tokens) as rec:
            got = run(unet, sample, t, {"encoder_hidden_states": key_states})
    assert_close(got, expected, 1e-10, "cfg output")
    assert_close(got[:1], uncond_alone, 1e-10, "uncond half")
    for n, m in rec.maps.items():
        assert m.shape[0] == 2
        assert_close(m, expected_maps[n], 1e-10, n)
    ctl.uninstall()


# ------------------------------------------------------------------------------------------------
# encoder_attention_mask
# ------------------------------------------------------------------------------------------------
def test_encoder_attention_mask_keep_all_and_truncation():
    unet = fresh_unet("sd15", torch.float64)
    sample, t, kw = make_call(unet, dtype=torch.float64)
    ehs = kw["encoder_hidden_states"]
    ref_states = torch.randn(2, M, text_width(unet), dtype=torch.float64)
    ctl = install(unet)
    tokens = [1, 7]

    def both(ehs_, refs_, mask=None):
        with torch.no_grad():
            with ctl.capture(tokens) as cap:
                out = run(unet, sample, t, kw, encoder_hidden_states=ehs_, encoder_attention_mask=mask)
            with ctl.subject_loss(refs_, tokens) as sl:
                run(unet, sample, t, kw, encoder_hidden_states=ehs_, encoder_attention_mask=mask)
        return out, cap.maps, sl.loss

    out0, maps0, loss0 = both(ehs, ref_states)
    out1, maps1, loss1 = both(ehs, ref_states, torch.ones(2, M))
    assert_close(out1, out0, 1e-12, "keep-all output")
    assert_close(loss1, loss0, 1e-12, "keep-all loss")
    for n in maps0:
        assert_close(maps1[n], maps0[n], 1e-12, n)

    drop_last = torch.ones(2, M)
    drop_last[:, -1] = 0
    out2, maps2, loss2 = both(ehs, ref_states, drop_last)
    out3, maps3, loss3 = both(ehs[:, :-1], ref_states[:, :-1])
    assert_close(out2, out3, 1e-10, "masked-last output")
    assert_close(loss2, loss3, 1e-10, "masked-last loss (the reference is masked alike)")
    for n in maps2:
        assert_close(maps2[n], maps3[n], 1e-10, n)
    assert rel_err(out2, out0) > 1e-6

    # a reference prompt of another length is not masked by the target's mask ...
    short_ref = ref_states[:, :-1]
    _, _, loss4 = both(ehs, short_ref, drop_last)
    with torch.no_grad(), ctl.subject_loss(short_ref, tokens,
                                          ref_attention_mask=torch.ones(1, M - 1)) as sl:
        run(unet, sample, t, kw, encoder_attention_mask=drop_last)
    assert_close(sl.loss, loss4, 1e-12, "unmasked short reference")
    # ... and ref_attention_mask masks it explicitly
    with torch.no_grad(), ctl.subject_loss(ref_states, tokens, ref_attention_mask=drop_last) as sl:
        run(unet, sample, t, kw)
    with torch.no_grad(), ctl.subject_loss(ref_states[:, :-1], tokens) as sl_trunc:
        run(unet, sample, t, kw)
    assert_close(sl.loss, sl_trunc.loss, 1e-10, "ref_attention_mask = truncating the reference")
    ctl.uninstall()


# ------------------------------------------------------------------------------------------------
# install / uninstall, filters, several UNets, replaced processors
# ------------------------------------------------------------------------------------------------
def test_uninstall_restores_the_same_objects():
    unet = fresh_unet("sd15")
    legacy = AttnProcessor()
    name = "up_blocks.1.attentions.2.transformer_blocks.0.attn1.processor"
    unet.set_attn_processor({**dict(unet.attn_processors), name: legacy})
    before = dict(unet.attn_processors)
    ctl = install(unet)
    with pytest.raises(ValueError, match="already has semfid processors"):
        install(unet)
    ctl.uninstall()
    after = unet.attn_processors
    assert list(after) == list(before)
    assert all(after[k] is before[k] for k in before)
    assert after[name] is legacy
    ctl.uninstall()  # no-op
    with pytest.raises(RuntimeError, match="uninstalled"):
        ctl.capture([1]).__enter__()
    sample, t, kw = make_call(unet)
    with torch.no_grad():
        run(unet, sample, t, kw)  # hook removed: plain call works
    ctl2 = install(unet)  # and it can be installed again
    with pytest.raises(TypeError, match="SemfidController cannot be deep-copied"):
        copy.deepcopy(ctl2)
    ctl2.uninstall()
    copy.deepcopy(unet)  # fine once uninstalled (deepcopy while installed: tests/test_drop_in.py)


def test_install_refuses_processors_it_cannot_reproduce():
    unet = fresh_unet("sd15")

    class Custom(AttnProcessor2_0):
        pass

    key = next(iter(unet.attn_processors))
    unet.set_attn_processor({**dict(unet.attn_processors), key: Custom()})
    with pytest.raises(ValueError, match="cannot stand in for.*Custom"):
        install(unet)


def test_layer_filters():
    unet = fresh_unet("sd15")
    names = list(cross_attention_layers(unet))
    ctl = install(unet, layers=lambda n: n.startswith("up_blocks"))
    assert ctl.layers == [n for n in names if n.startswith("up_blocks")] and len(ctl.layers) == 9
    active = {n for n, p in ((k[:-10], v) for k, v in unet.attn_processors.items()) if p.active}
    assert active == set(ctl.layers)
    sample, t, kw = make_call(unet)
    with torch.no_grad():
        with ctl.capture([1]) as rec:
            run(unet, sample, t, kw)
        assert set(rec.maps) == set(ctl.layers)
        one = ctl.layers[4]
        with ctl.capture([1], layers=[one + ".processor"]) as rec1:
            run(unet, sample, t, kw)
        assert list(rec1.maps) == [one]
        with ctl.subject_loss(torch.randn(1, M, text_width(unet)), [2], layers=ctl.layers[:2]) as sl:
            run(unet, sample, t, kw)
        assert list(sl.layer_losses) == ctl.layers[:2]
    with pytest.raises(ValueError, match=r"^layers matches none"):
        ctl.capture([1], layers=lambda n: "mid_block" in n)
    with pytest.raises(ValueError, match=r"^layers names layers that are not available"):
        ctl.capture([1], layers=[names[0]])  # installed but not chosen at install
    with pytest.raises(TypeError, match=r"^layers must"):
        ctl.capture([1], layers=3)
    ctl.uninstall()
    with pytest.raises(ValueError, match=r"^layers matches none"):
        install(unet, layers=lambda n: False)
    with pytest.raises(ValueError, match=r"^layers names layers.*down_blocks.9"):
        install(unet, layers=["down_blocks.9.attentions.0.transformer_blocks.0.attn2"])
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())


def test_two_unets_in_one_process():
    a, b = fresh_unet("sd15"), fresh_unet("sdxl")
    ca, cb = install(a), install(b)
    sa, ta, ka = make_call(a)
    sb, tb, kb = make_call(b)
    with torch.no_grad():
        b_plain = run(b, sb, tb, kb)
        with ca.capture([1]) as ra:
            run(a, sa, ta, ka)
            b_during = run(b, sb, tb, kb)  # b's controller has nothing active
        with ca.capture([2]) as ra2, cb.capture([3, 4]) as rb:
            run(a, sa, ta, ka)
            run(b, sb, tb, kb)
    assert len(ra.maps) == 16 and torch.equal(b_during, b_plain)
    assert len(ra2.maps) == 16 and len(rb.maps) == 70
    assert next(iter(rb.maps.values())).shape[-1] == 2
    ca.uninstall()
    cb.uninstall()


def test_detects_replaced_processors():
    unet = fresh_unet("sd15")
    sample, t, kw = make_call(unet)
    ctl = install(unet)
    unet.set_attn_processor(SlicedAttnProcessor(1))  # a processor semfid does not reproduce
    with pytest.raises(RuntimeError, match=r"16 layer\(s\) to record run a processor .*SlicedAttnProcessor"):
        with ctl.capture([1]):
            pass
    with pytest.raises(RuntimeError, match="SlicedAttnProcessor"):
        ctl.subject_loss(torch.randn(1, M, text_width(unet)), [1]).__enter__()
    ctl.uninstall()  # leaves the replacement in place
    assert all(isinstance(p, SlicedAttnProcessor) for p in unet.attn_processors.values())
    unet.set_attn_processor(AttnProcessor2_0())

    ctl = install(unet)
    with torch.no_grad(), ctl.capture([1]) as rec:
        unet.fuse_qkv_projections()  # replaced in the middle of the block
        with pytest.raises(RuntimeError, match="FusedAttnProcessor2_0"):
            run(unet, sample, t, kw)
    with pytest.raises(NoCallError, match=r"no UNet call ran inside the `with ctl.capture"):
        rec.maps


def test_processor_init_says_what_to_install(monkeypatch):
    monkeypatch.delattr(torch.nn.functional, "scaled_dot_product_attention")
    with pytest.raises(ImportError, match="PyTorch >= 2.1"):
        SemfidAttnProcessor("x.attn2", object())


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def test_bad_input_names_the_argument():
    unet = fresh_unet("sd15")
    C = text_width(unet)
    sample, t, kw = make_call(unet)
    ctl = install(unet)
    refs = torch.randn(1, M, C)

    with pytest.raises(ValueError, match=r"^tokens must index the 77 text tokens.*got index 77"):
        with torch.no_grad(), ctl.capture([3, 77]):
            run(unet, sample, t, kw)
    with pytest.raises(ValueError, match=r"^tokens must index the 10 text tokens"):
        with torch.no_grad(), ctl.subject_loss(refs, [12]):
            run(unet, sample, t, kw, encoder_hidden_states=torch.randn(2, 10, C))
    with pytest.raises(ValueError, match=r"^tokens must be non-negative"):
        ctl.capture([-1])
    with pytest.raises(TypeError, match=r"^tokens must hold integer"):
        ctl.capture([1.5])
    with pytest.raises(TypeError, match=r"^tokens must hold integer"):
        ctl.capture(torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"^tokens has 3 rows but the UNet call has batch 2"):
        with torch.no_grad(), ctl.capture(torch.zeros(3, 1, dtype=torch.long)):
            run(unet, sample, t, kw)
    with pytest.raises(ValueError, match=r"^ref_tokens must index the 20 text tokens of reference_states"):
        ctl.subject_loss(torch.randn(1, 20, C), [1], ref_tokens=[25])
    with pytest.raises(ValueError, match=r"^ref_tokens must select as many"):
        ctl.subject_loss(refs, [1, 2], ref_tokens=[1])
    with pytest.raises(ValueError, match=r"^reference_states must have width C=32"):
        ctl.subject_loss(torch.randn(1, M, C + 1), [1])
    with pytest.raises(ValueError, match=r"^reference_states must be \[B, M, C\]"):
        ctl.subject_loss(torch.randn(M, C), [1])
    with pytest.raises(ValueError, match=r"^reference_states must have batch 1 or the UNet call's batch 2"):
        with torch.no_grad(), ctl.subject_loss(torch.randn(3, M, C), [1]):
            run(unet, sample, t, kw)
    with pytest.raises(ValueError, match=r"^reference_states must have an entry for every chosen layer"):
        ctl.subject_loss({ctl.layers[0]: refs}, [1])
    with pytest.raises(ValueError, match=r"^value_states must have width"):
        ctl.values(torch.randn(2, M, C + 3))
    with pytest.raises(ValueError, match=r"^value_states must have the 77 tokens of encoder_hidden_states"):
        with torch.no_grad(), ctl.values(torch.randn(2, M - 1, C)):
            run(unet, sample, t, kw)
    with pytest.raises(TypeError, match=r"^value_states must have the dtype"):
        with torch.no_grad(), ctl.values(torch.randn(2, M, C, dtype=torch.float64)):
            run(unet, sample, t, kw)
    with pytest.raises(ValueError, match=r"^value_states has entries for layers that are not chosen"):
        ctl.values({"nope.attn2": torch.randn(2, M, C)})
    with pytest.raises(ValueError, match=r"^head_reduce must be one of"):
        ctl.capture([1], head_reduce="max")
    with pytest.raises(ValueError, match=r"^layers matches none"):
        ctl.subject_loss(refs, [1], layers=lambda n: False)
    with pytest.raises(RuntimeError, match="cannot be nested"):
        with ctl.subject_loss(refs, [1]), ctl.subject_loss(refs, [1]):
            pass
    # the failed blocks above left nothing active behind
    assert ctl._frames() == ()
    ctl.uninstall()


# ------------------------------------------------------------------------------------------------
# threads
# ------------------------------------------------------------------------------------------------
def test_blocks_are_per_thread():
    """Thread A holds a capture block open while thread B runs its own and a plain call."""
    unet = fresh_unet("sd15")
    ctl = install(unet)
    sample, t, kw = make_call(unet)
    with torch.no_grad():
        plain = run(unet, sample, t, kw)
    a_entered, b_done = threading.Event(), threading.Event()
    results, errors = {}, []

    def thread_a():
        try:
            with torch.no_grad(), ctl.capture([1, 2, 3]) as rec:
                a_entered.set()
                b_done.wait(60)
                run(unet, sample, t, kw)
            results["a"] = rec
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def thread_b():
        try:
            a_entered.wait(60)
            with torch.no_grad():
                results["b_plain"] = run(unet, sample, t, kw)  # A's block must not leak here
                with ctl.capture([7]) as rec:
                    run(unet, sample, t, kw)
            results["b"] = rec
        except Exception as exc:  # pragma: no cover
            errors.append(exc)
        finally:
            b_done.set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors
    assert results["a"].num_calls == 1 and results["b"].num_calls == 1
    assert next(iter(results["a"].maps.values())).shape[-1] == 3
    assert next(iter(results["b"].maps.values())).shape[-1] == 1
    assert torch.equal(results["b_plain"], plain)
    ctl.uninstall()


# ------------------------------------------------------------------------------------------------
# low precision, torch.compile
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_smoke(dtype):
    unet = fresh_unet("sd15", dtype)
    sample, t, kw = make_call(unet, dtype=dtype)
    ks = kw["encoder_hidden_states"].clone().requires_grad_(True)
    ctl = install(unet)
    with ctl.subject_loss(torch.randn(1, M, text_width(unet), dtype=dtype), [1, 2]) as rec:
        pred = run(unet, sample, t, kw, encoder_hidden_states=ks)
    assert pred.dtype == dtype and rec.loss.dtype == torch.float32
    (pred.float().square().mean() + rec.loss.sum()).backward()
    assert torch.isfinite(ks.grad.float()).all() and ks.grad.abs().sum() > 0
    with torch.no_grad(), ctl.capture([1, 2]) as cap:
        run(unet, sample, t, kw)
    # compared with the same UNet in fp32
    ref32 = fresh_unet("sd15")
    ctl32 = install(ref32)
    with torch.no_grad(), ctl32.capture([1, 2]) as cap32:
        run(ref32, sample.float(), t, {"encoder_hidden_states": kw["encoder_hidden_states"].float()})
    for n, m in cap.maps.items():
        assert m.dtype == torch.float32
        assert (m - cap32.maps[n]).abs().max() < 0.05, n
    ctl.uninstall()
    ctl32.uninstall()


def test_autocast_with_checkpointing_smoke():
    """The SeFi-IDE training setup: autocast (bf16 on CPU) + gradient checkpointing + K/V split."""
    unet = fresh_unet("sd15")
    unet.enable_gradient_checkpointing()
    sample, t, kw = make_call(unet)
    ks = kw["encoder_hidden_states"].clone().requires_grad_(True)
    vs = torch.randn_like(ks, requires_grad=True)
    ctl = install(unet)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with ctl.subject_loss(torch.randn(1, M, text_width(unet)).expand(2, -1, -1), [3, 4],
                              value_states=vs) as rec:
            pred = run(unet, sample, t, kw, encoder_hidden_states=ks)
        loss = pred.float().square().mean() + rec.loss.mean()
    loss.backward()
    assert pred.dtype == torch.bfloat16 and len(rec.layer_losses) == 16
    for g in (ks.grad, vs.grad):
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    ctl.uninstall()


@pytest.mark.slow
def test_torch_compile_smoke():
    """torch.compile of a UNet with semfid processors: same outputs and maps as eager.

    No block active: one graph. Under capture, Dynamo guards on the per-call state and each
    recording layer graph-breaks in semfid's backend selection (controller docstring, "Limits");
    the results must still equal eager.
    """
    torch._dynamo.reset()
    unet = fresh_unet("sd15")
    sample, t, kw = make_call(unet, B=1, latent=16, M=11)
    ctl = install(unet)
    with torch.no_grad():
        eager = run(unet, sample, t, kw)
        with ctl.capture([1, 2]) as rec_eager:
            run(unet, sample, t, kw)
    compiled = torch.compile(unet, backend="aot_eager")
    with torch.no_grad():
        out = compiled(sample, t, **kw).sample
        with ctl.capture([1, 2]) as rec:
            out_cap = compiled(sample, t, **kw).sample
    assert_close(out, eager, 1e-5, "compiled output")
    assert_close(out_cap, eager, 1e-5, "compiled output under capture")
    assert len(rec.maps) == 16
    for n, m in rec.maps.items():
        assert_close(m, rec_eager.maps[n], 1e-5, n)
    ctl.uninstall()
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# full-size SD1.5 (random weights), 256 px
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_full_size_sd15_forward_backward_256px():
    torch.manual_seed(0)
    unet = unet_from_config("sd15_unet").eval().requires_grad_(False)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    unet.enable_gradient_checkpointing()
    ctl = install(unet)
    assert len(ctl.layers) == 16
    sample = torch.randn(1, 4, 32, 32)
    ks = torch.randn(1, M, 768, requires_grad=True)
    vs = torch.randn(1, M, 768, requires_grad=True)
    with ctl.subject_loss(torch.randn(1, M, 768), [5], value_states=vs) as rec:
        pred = unet(sample, torch.tensor([500]), encoder_hidden_states=ks).sample
    assert pred.shape == sample.shape and len(rec.layer_losses) == 16
    (pred.square().mean() + 0.003 * rec.loss.sum()).backward()
    assert torch.isfinite(ks.grad).all() and ks.grad.abs().sum() > 0
    assert torch.isfinite(vs.grad).all() and vs.grad.abs().sum() > 0
    ctl.uninstall()
