"""Maps of the image-prompt tokens of IP-Adapter layers (``capture(..., ip_tokens=...)``, issue 25).

Against an explicit float64 softmax (``test_ip_adapter.RefIPProcessor``) on the tiny SD1.5 twin with
one adapter (Plus-sized: 16 tokens, two images) and with two (4 and 16 tokens), with masks and
per-layer scales (some 0: diffusers skips the branch's output, the maps are still recorded); the
output with maps asked for equals the stock IP-Adapter processor's, the text maps are the same as
without ``ip_tokens``; accumulation / ``aggregate(adapter=)``; the errors.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import (ImageProjection, IPAdapterPlusImageProjection,
                                         MultiIPAdapterImageProjection)

from semfid.diffusers import NoCallError, install

from _diffusers_ref import RefState, _gather
from test_ip_adapter import IMG_D, LATENT, M, base_pipe, fresh_pipe, install_ref_ip, make_masks, rel_err, run, tiny_dir  # noqa: F401

B = 2
CLIP_TOKENS = 5  # CLIP hidden-state tokens a Plus projection reads per image


def add_adapters(unet, sizes, seed=5):
    """IP-Adapters of ``sizes`` image tokens each (4: ImageProjection, 16: IPAdapterPlusImageProjection),
    put in place as diffusers' _load_ip_adapter_weights does; per-layer scales, adapter 0's 0 in
    every third layer."""
    torch.manual_seed(seed)
    c = unet.config.cross_attention_dim
    modules = dict(unet.named_modules())
    procs = {}
    for i, (key, proc) in enumerate(unet.attn_processors.items()):
        if key.endswith("attn1.processor"):
            procs[key] = type(proc)()
            continue
        hidden = modules[key[: -len(".processor")]].to_k.out_features
        procs[key] = IPAdapterAttnProcessor2_0(hidden, c, num_tokens=list(sizes), scale=1.0)
        procs[key].scale = [0.0 if i % 3 == 0 and a == 0 else 0.6 + 0.3 * a for a in range(len(sizes))]
    unet.set_attn_processor(procs)
    projections = [ImageProjection(IMG_D, c, 4) if n == 4 else
                   IPAdapterPlusImageProjection(embed_dims=IMG_D, output_dims=c, hidden_dims=64, depth=1,
                                                dim_head=16, heads=2, num_queries=16) for n in sizes]
    unet.encoder_hid_proj = MultiIPAdapterImageProjection(projections)
    unet.config.encoder_hid_dim_type = "ip_image_proj"


def make_call(unet, sizes, images, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(B, 4, LATENT, LATENT, generator=g).to(dtype)
    ehs = torch.randn(B, M, unet.config.cross_attention_dim, generator=g).to(dtype)
    embeds = [torch.randn(B, n, *(() if size == 4 else (CLIP_TOKENS,)), IMG_D, generator=g).to(dtype)
              for size, n in zip(sizes, images)]
    return sample, torch.full((B,), 11), ehs, {"image_embeds": embeds}


def built(base_pipe, sizes, dtype):
    unet = fresh_pipe(base_pipe, dtype).unet
    add_adapters(unet, sizes)
    return unet.to(dtype)


def expected(probs, layer, adapter, choice, head_reduce):
    """The reference's probabilities of adapter ``adapter`` in ``layer``, columns ``choice``."""
    p = probs[(layer, adapter)]
    if choice == "all":
        return p.mean(dim=1) if head_reduce == "mean" else p
    ragged = len({len(r) for r in choice if isinstance(r, list)}) > 1
    return _gather(p, choice if ragged else torch.tensor(choice), head_reduce)


CASES = {
    # one Plus-sized adapter, two images (32 keys, one softmax), positions in both images
    "one-adapter": dict(sizes=(16,), images=(2,), masked=False, ip_tokens=[0, 5, 15, 20, 31],
                        head_reduce="mean"),
    # plain (4) + Plus (16) with masks (one softmax per image), per-head maps, ragged rows
    "two-adapters-masked": dict(sizes=(4, 16), images=(2, 1), masked=True,
                                ip_tokens={0: "all", 1: [[2, 15], [7]]}, head_reduce="none"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_ip_maps_match_explicit_softmax(base_pipe, case):
    """float64: the maps of the image-prompt tokens, the text maps and the output against the
    explicit reference; text maps the same as a capture's without ip_tokens."""
    cfg = CASES[case]
    unet = built(base_pipe, cfg["sizes"], torch.float64)
    ref = copy.deepcopy(unet)
    state, probs = RefState(head_reduce=cfg["head_reduce"]), {}
    install_ref_ip(ref, state, probs)
    ctl = install(unet)
    call = make_call(unet, cfg["sizes"], cfg["images"], torch.float64)
    masks = [m.double() for m in make_masks(cfg["images"])] if cfg["masked"] else None
    tokens = [1, 4]
    with torch.no_grad():
        with ctl.capture(tokens, head_reduce=cfg["head_reduce"], ip_tokens=cfg["ip_tokens"]) as rec:
            out = run(unet, call, masks)
        with ctl.capture(tokens, head_reduce=cfg["head_reduce"]) as text_only:
            run(unet, call, masks)
        state.tokens = torch.tensor(tokens)
        want = run(ref, call, masks)
    assert rel_err(out, want) <= 1e-10
    assert rec.maps.keys() == text_only.maps.keys() and len(rec.maps) == 16
    for n, m in rec.maps.items():  # the first layer's bitwise; later ones see the fused op's output
        assert rel_err(m, text_only.maps[n]) <= 1e-12, n
        assert rel_err(m, state.maps[n]) <= 1e-10, n
    first_layer = next(iter(rec.maps))
    assert torch.equal(rec.maps[first_layer], text_only.maps[first_layer])
    ip = rec.ip_maps
    assert set(ip) == set(rec.maps)
    per_adapter = cfg["ip_tokens"] if isinstance(cfg["ip_tokens"], dict) else {0: cfg["ip_tokens"]}
    for layer, maps in ip.items():
        assert set(maps) == set(per_adapter)
        for a, choice in per_adapter.items():
            exp = expected(probs, layer, a, choice, cfg["head_reduce"])
            assert maps[a].shape == exp.shape and rel_err(maps[a], exp) <= 1e-10, (layer, a)
    # scale 0 (adapter 0 in every third layer) skips the output, not the maps: probabilities sum to 1
    first = ip["down_blocks.0.attentions.0.transformer_blocks.0.attn2"][0]
    keys = cfg["sizes"][0] * cfg["images"][0]
    if per_adapter[0] == "all":
        assert first.shape[-1] == keys
        assert torch.allclose(first.sum(-1), torch.full_like(first.sum(-1), cfg["images"][0]))
    ctl.uninstall()


@pytest.mark.slow
def test_ip_maps_fp32_output_accumulate_aggregate(base_pipe, tmp_path):
    """fp32: the output with image-prompt maps asked for = stock IP-Adapter (≤ 1e-5); "list" /
    "mean" accumulation; aggregate / save_heatmaps of an adapter; image-prompt maps only."""
    sizes, images = (4, 16), (1, 1)
    unet = built(base_pipe, sizes, torch.float32)
    stock = copy.deepcopy(unet)
    ctl = install(unet)
    calls = [make_call(unet, sizes, images, torch.float32, seed=s) for s in (0, 1)]
    with torch.no_grad():
        with ctl.capture([1], accumulate="list", ip_tokens={1: [3, 9]}) as rec:
            outs = [run(unet, c) for c in calls]
        with ctl.capture(None, accumulate="mean", ip_tokens="all") as mean:
            for c in calls:
                run(unet, c)
        wants = [run(stock, c) for c in calls]
    for out, want in zip(outs, wants):
        assert rel_err(out, want) <= 1e-5
    assert rec.num_calls == 2 and len(rec.ip_steps) == 2
    layer = next(n for n, g in rec.grids.items() if g == (4, 4))
    assert set(rec.ip_maps[layer]) == {1} and rec.ip_maps[layer][1].shape == (B, 16, 2)
    assert torch.equal(rec.ip_maps[layer][1], rec.ip_steps[1][layer][1])
    steps = [rec.ip_steps[i][layer][1] for i in range(2)]
    assert not torch.equal(steps[0], steps[1])
    # "all" of adapter 1 holds the columns [3, 9]; the mean over the two calls
    mean_1 = mean.ip_maps[layer][1]
    assert mean_1.shape == (B, 16, 16)
    assert rel_err(mean_1[..., [3, 9]], (steps[0] + steps[1]) / 2) <= 1e-6
    with pytest.raises(NoCallError, match="no maps of text tokens"):
        mean.maps
    heat = rec.aggregate(res=4, step=1, adapter=1)  # the 4x4 layers, call 1
    layers4 = [n for n, g in rec.grids.items() if g == (4, 4)]
    want = torch.stack([rec.ip_steps[1][n][1].transpose(1, 2).reshape(B, 2, 4, 4) for n in layers4]).mean(0)
    assert heat.shape == (B, 2, 4, 4) and rel_err(heat, want) <= 1e-6
    assert rec.aggregate(res=4).shape == (B, 1, 4, 4)  # the text maps as before
    grid = mean.save_heatmaps(tmp_path / "ip.png", res=4, adapter=0, row=1)
    assert (tmp_path / "ip.png").exists() and grid.size[0] > 0
    with pytest.raises(ValueError, match="adapter=0: no image-prompt maps"):
        rec.aggregate(res=4, adapter=0)

    # gradient checkpointing, backward after the block: the maps are differentiable and the
    # recompute records nothing a second time
    unet.enable_gradient_checkpointing()
    unet.train()
    embeds = [e.clone().requires_grad_(True) for e in calls[0][3]["image_embeds"]]
    with ctl.capture(None, ip_tokens={0: [1, 2]}) as grad_rec:
        out = run(unet, (*calls[0][:3], {"image_embeds": embeds}))
    kept = {n: m[0] for n, m in grad_rec.ip_maps.items()}
    (out.square().mean() + sum(m.square().sum() for m in kept.values())).backward()
    assert grad_rec.num_calls == 1 and all(grad_rec.ip_maps[n][0] is m for n, m in kept.items())
    assert embeds[0].grad.abs().sum() > 0 and embeds[1].grad.abs().sum() > 0
    ctl.uninstall()


def test_ip_tokens_errors(base_pipe):
    sizes = (4, 16)
    unet = built(base_pipe, sizes, torch.float32)
    ctl = install(unet)
    for bad, err, msg in [(1.5, TypeError, "ip_tokens must be"), ("first", ValueError, "'all' or"),
                          ({"0": [1]}, TypeError, "adapter indices"), ({}, ValueError, "empty dict"),
                          ([-1], ValueError, "non-negative"), ({2: "all"}, ValueError, "hold 2 adapter"),
                          ([[0.5]], TypeError, "integer"), (object(), TypeError, "ip_tokens must be"),
                          ({0: "ALL"}, ValueError, r"ip_tokens\[0\] must be 'all'")]:
        with pytest.raises(err, match=msg):
            ctl.capture([1], ip_tokens=bad)
    with pytest.raises(ValueError, match="tokens must give text-token indices"):
        ctl.capture(None)
    call = make_call(unet, sizes, (1, 1), torch.float32)
    with torch.no_grad():  # per call: past the 4 image tokens of adapter 0 (one image)
        with pytest.raises(ValueError, match=r"ip_tokens must index the 4 image-prompt tokens of "
                                             r"IP-Adapter 0 \(num_tokens=4 per image x 1 image"):
            with ctl.capture([1], ip_tokens=[4]):
                run(unet, call)
        with pytest.raises(ValueError, match=r"ip_tokens\[1\] must index the 16 image-prompt"):
            with ctl.capture(None, ip_tokens={0: "all", 1: [16]}):
                run(unet, call)
        with pytest.raises(ValueError, match=r"ip_tokens\[1\] has 3 rows but the UNet call has batch 2"):
            with ctl.capture(None, ip_tokens={1: [[0], [1], [2]]}):
                run(unet, call)
        with ctl.capture([1]) as rec:
            run(unet, call)
    with pytest.raises(ValueError, match="ip_maps needs capture"):
        rec.ip_maps
    ctl.uninstall()
    plain = install(fresh_pipe(base_pipe).unet)  # no IP-Adapter
    with pytest.raises(ValueError, match="needs IP-Adapter layers, but none of the 16 chosen"):
        plain.capture([1], ip_tokens="all")
    plain.uninstall()


@pytest.mark.slow
def test_compiled_ip_maps_never_recompile(base_pipe):
    """torch.compile(fullgraph=True): three blocks with new image-prompt positions (same count) and
    new inputs compile once; maps equal the eager ones; a position past the keys is clamped in the
    graph and named when the block exits (no recompile)."""
    from torch._dynamo.utils import counters

    sizes, images = (4, 16), (1, 2)
    unet = built(base_pipe, sizes, torch.float32).eval()
    ctl = install(unet)
    compiled = torch.compile(unet, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    first = None
    try:
        for step in range(3):
            call = make_call(unet, sizes, images, torch.float32, seed=10 + step)
            ip_tokens = {0: [step % 4, 3 - step], 1: "all"}
            recs = []
            for model in (compiled, unet):
                with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=first is not None):
                    with ctl.capture([1, 2 + step], ip_tokens=ip_tokens) as rec:
                        run(model, call)
                recs.append(rec)
                if first is None:
                    first = counters["stats"]["unique_graphs"]
            assert counters["stats"]["unique_graphs"] == first, f"step {step} compiled a new graph"
            got, want = (r.ip_maps for r in recs)
            for layer in want:
                for a in (0, 1):
                    assert rel_err(got[layer][a], want[layer][a]) <= 1e-5, (layer, a)
        with torch._dynamo.config.patch(error_on_recompile=True):
            with pytest.raises(ValueError, match=r"ip_tokens\[0\] must index the 4 image-prompt tokens"):
                with torch.no_grad(), ctl.capture([1, 2], ip_tokens={0: [0, 4], 1: "all"}):
                    run(compiled, call)
    finally:
        torch._dynamo.reset()
        ctl.uninstall()
