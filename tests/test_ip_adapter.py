"""IP-Adapter with semfid installed (issue 25): load / unload / scales in either order, stock output
with no block active, and capture / subject loss against an explicit-softmax reference.

IP-Adapter weights are built here as safetensors state dicts in diffusers' original-checkpoint
layout (``image_proj.*`` / ``ip_adapter.*``; plain and FaceID projections) and loaded with the
pipeline's own ``load_ip_adapter`` into the tiny SD1.5 pipeline (the UNet is the SD1.5 structural
twin: 16 cross-attention layers). A Plus-sized adapter (16 image tokens, diffusers'
``IPAdapterPlusImageProjection``) is put in place the way ``_load_ip_adapter_weights`` does it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.image_processor import IPAdapterMaskProcessor
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import IPAdapterPlusImageProjection, MultiIPAdapterImageProjection
from safetensors.torch import save_file

from semfid.diffusers import SemfidAttnProcessor, install
from semfid.diffusers.ip_adapter import SemfidIPAdapterAttnProcessor

from _diffusers_ref import ExplicitSoftmaxProcessor, RefState

IMG_D = 12  # width of the (stand-in) CLIP image / face-ID embeddings
LATENT = 8
M = 9  # text tokens


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from semfid.sefi.tiny import build_tiny_pipeline

    path = tmp_path_factory.mktemp("tiny_sd15")
    build_tiny_pipeline("sd15", path)
    return path


@pytest.fixture(scope="module")
def base_pipe(tiny_dir):
    return StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)


def fresh_pipe(base, dtype=torch.float32):
    parts = dict(base.components)
    parts["unet"] = copy.deepcopy(base.unet).to(dtype)
    return StableDiffusionPipeline(**parts)


def _cross_layers(unet):
    return [k for k in unet.attn_processors if not k.endswith("attn1.processor")]


def write_ip_weights(unet, path, kind: str, seed: int) -> str:
    """An IP-Adapter checkpoint of ``kind`` ("plain" / "faceid") for ``unet``, as safetensors."""
    g = torch.Generator().manual_seed(seed)
    c = unet.config.cross_attention_dim

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    if kind == "plain":
        proj = {"proj.weight": w(4 * c, IMG_D), "proj.bias": w(4 * c)}
    else:  # FaceID: two-layer MLP (x2) to 4 tokens
        proj = {"proj.0.weight": w(2 * IMG_D, IMG_D), "proj.0.bias": w(2 * IMG_D),
                "proj.2.weight": w(4 * c, 2 * IMG_D), "proj.2.bias": w(4 * c)}
    proj.update({"norm.weight": 1 + w(c), "norm.bias": w(c)})
    tensors = {f"image_proj.{k}": v for k, v in proj.items()}
    modules = dict(unet.named_modules())
    for i, key in enumerate(_cross_layers(unet)):
        hidden = modules[key[: -len(".processor")]].to_k.out_features
        tensors[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = w(hidden, c)
        tensors[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = w(hidden, c)
    name = f"{kind}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / name))
    return name


def load_adapters(pipe, path, kinds=("plain", "faceid")):
    names = [write_ip_weights(pipe.unet, path, k, seed=i + 7) for i, k in enumerate(kinds)]
    pipe.load_ip_adapter(str(path), subfolder="", weight_name=names, image_encoder_folder=None)


def add_plus_adapter(unet, seed=3):
    """A Plus-sized adapter (16 tokens) put in place as diffusers' _load_ip_adapter_weights does."""
    torch.manual_seed(seed)
    c = unet.config.cross_attention_dim
    procs = {}
    modules = dict(unet.named_modules())
    for key, proc in unet.attn_processors.items():
        if key.endswith("attn1.processor"):
            procs[key] = type(proc)()
            continue
        hidden = modules[key[: -len(".processor")]].to_k.out_features
        procs[key] = IPAdapterAttnProcessor2_0(hidden, c, num_tokens=[16], scale=0.7)
    unet.set_attn_processor(procs)
    proj = IPAdapterPlusImageProjection(embed_dims=IMG_D, output_dims=c, hidden_dims=64, depth=1,
                                        dim_head=16, heads=2, num_queries=16)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([proj])
    unet.config.encoder_hid_dim_type = "ip_image_proj"


def make_call(unet, B=2, images=(2, 1), dtype=torch.float32, seed=0, image_tokens=()):
    """UNet inputs; ``images``: images per adapter; ``image_tokens``: CLIP hidden-state tokens per
    image (Plus adapters read [B, n_img, tokens, D] embeddings, the others [B, n_img, D])."""
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(B, 4, LATENT, LATENT, generator=g).to(dtype)
    ehs = torch.randn(B, M, unet.config.cross_attention_dim, generator=g).to(dtype)
    embeds = [torch.randn(B, n, *image_tokens, IMG_D, generator=g).to(dtype) for n in images]
    return sample, torch.full((B,), 11), ehs, {"image_embeds": embeds}


def make_masks(images=(2, 1), seed=1):
    g = torch.Generator().manual_seed(seed)
    masks = [(torch.rand(1, n, 16, 16, generator=g) > 0.4).float() for n in images]
    masks[0][:, 0, :, :8] = 1.0
    return masks


def run(unet, call, masks=None):
    sample, t, ehs, added = call
    cak = {"ip_adapter_masks": masks} if masks is not None else None
    return unet(sample, t, encoder_hidden_states=ehs, added_cond_kwargs=added, cross_attention_kwargs=cak).sample


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------------
# explicit-softmax reference of an IP-Adapter layer
# ------------------------------------------------------------------------------------------------
class _AddBeforeOut:
    """``attn`` as the text reference sees it, with ``extra`` added right before ``to_out[0]``."""

    def __init__(self, attn, extra):
        self._attn = attn
        self.to_out = [lambda x: attn.to_out[0](x + extra.to(x.dtype)), attn.to_out[1]]

    def __getattr__(self, name):
        return getattr(self._attn, name)


class RefIPProcessor:
    """Text branch: tests/_diffusers_ref.ExplicitSoftmaxProcessor (maps, loss). Image branch: per
    adapter (per image with masks) explicit ``softmax(q k_ipᵀ · scale) v_ip``, scaled, masked."""

    def __init__(self, name, state, stock: IPAdapterAttnProcessor2_0, ip_probs=None):
        self.text = ExplicitSoftmaxProcessor(name, state)
        self.stock = stock
        self.ip_probs = {} if ip_probs is None else ip_probs  # (layer, adapter) -> [B, H, N, keys]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 ip_adapter_masks=None):
        text, ip_states = encoder_hidden_states
        B, N, _ = hidden_states.shape
        H = attn.heads

        def heads(x):
            return x.reshape(x.shape[0], x.shape[1], H, -1).permute(0, 2, 1, 3)

        probs = []  # this adapter's probabilities [B, H, N, keys], one per softmax

        def attend(q, states, to_k, to_v):
            k, v = heads(to_k(states)), heads(to_v(states))
            p = torch.softmax(torch.einsum("bhnd,bhmd->bhnm", q, k) * attn.scale, dim=-1)
            probs.append(p)
            return torch.einsum("bhnm,bhmd->bhnd", p, v).permute(0, 2, 1, 3).reshape(B, N, -1)

        q = heads(attn.to_q(hidden_states))
        extra = torch.zeros(B, N, attn.to_q.out_features, dtype=q.dtype)
        masks = ip_adapter_masks or [None] * len(ip_states)
        for a, (states, scale, to_k, to_v, mask) in enumerate(zip(ip_states, self.stock.scale, self.stock.to_k_ip,
                                                                  self.stock.to_v_ip, masks)):
            probs.clear()
            if mask is None:
                extra = extra + scale * attend(q, states.reshape(B, -1, states.shape[-1]), to_k, to_v)
            else:
                scales = scale if isinstance(scale, list) else [scale] * mask.shape[1]
                for i in range(mask.shape[1]):
                    down = IPAdapterMaskProcessor.downsample(mask[:, i], B, N, 1).to(q.dtype)
                    extra = extra + scales[i] * attend(q, states[:, i], to_k, to_v) * down
            # image-prompt probabilities on the adapter's key axis (masked: one softmax per image)
            self.ip_probs[(self.text.name, a)] = torch.cat(probs, dim=-1)
        return self.text(_AddBeforeOut(attn, extra), hidden_states, text, attention_mask, temb)


def install_ref_ip(unet, state, ip_probs=None):
    procs = {}
    for key, proc in unet.attn_processors.items():
        name = key[: -len(".processor")]
        procs[key] = (RefIPProcessor(name, state, proc, ip_probs) if isinstance(proc, IPAdapterAttnProcessor2_0)
                      else ExplicitSoftmaxProcessor(name, state))
    unet.set_attn_processor(procs)


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["load_then_install", "install_then_load"])
def test_stock_output_with_no_block_either_order(base_pipe, tmp_path, order):
    """Plain + FaceID adapters, masks and per-layer scales: installed output = stock IP output (fp32)."""
    stock = fresh_pipe(base_pipe)
    load_adapters(stock, tmp_path)
    ours = fresh_pipe(base_pipe)
    if order == "install_then_load":
        ctl = install(ours.unet)
        load_adapters(ours, tmp_path)  # diffusers rebuilds attn1 as type(old)() = SemfidAttnProcessor()
    else:
        load_adapters(ours, tmp_path)
        ctl = install(ours.unet)
    scales = [{"down": 0.5, "up": {"block_1": [0.0, 1.2, 0.8]}}, 0.6]
    for pipe in (stock, ours):
        pipe.set_ip_adapter_scale(scales)
    call, masks = make_call(stock.unet), make_masks()
    with torch.no_grad():
        want = run(stock.unet, call, masks)
        got = run(ours.unet, call, masks)
        with ctl.capture([1, 2]) as rec:  # the block adopts diffusers' IP processors, then records
            got_block = run(ours.unet, call, masks)
        got_after = run(ours.unet, call, masks)
    assert rel_err(got, want) <= 1e-5 and rel_err(got_block, want) <= 1e-5 and rel_err(got_after, want) <= 1e-5
    assert len(rec.maps) == 16
    procs = ours.unet.attn_processors
    assert sum(isinstance(p, SemfidIPAdapterAttnProcessor) for p in procs.values()) == 16
    scale = procs["up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor"].scale
    assert scale == [1.2, 0.6]  # set_ip_adapter_scale's per-layer scales survived adoption
    ctl.uninstall()  # stock IP-Adapter processors with the same weights come back
    procs = ours.unet.attn_processors
    assert {type(p) for k, p in procs.items() if "attn2" in k} == {IPAdapterAttnProcessor2_0}
    with torch.no_grad():
        assert rel_err(run(ours.unet, call, masks), want) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("masked", [False, True])
def test_capture_and_loss_match_explicit_reference(base_pipe, tmp_path, masked):
    """float64: outputs, text maps and subject loss (+ gradients) against RefIPProcessor."""
    pipe = fresh_pipe(base_pipe, torch.float64)
    load_adapters(pipe, tmp_path)
    pipe.set_ip_adapter_scale([0.8, 1.3])
    unet = pipe.unet
    ref = copy.deepcopy(unet)
    state = RefState()
    install_ref_ip(ref, state)
    ctl = install(unet)
    call = make_call(unet, dtype=torch.float64)
    masks = [m.double() for m in make_masks()] if masked else None
    tokens = [1, 4, 7]
    with torch.no_grad():
        with ctl.capture(tokens) as rec:
            out = run(unet, call, masks)
        state.tokens = torch.tensor(tokens)
        want = run(ref, call, masks)
    assert rel_err(out, want) <= 1e-10
    assert set(rec.maps) == set(state.maps) and len(rec.maps) == 16
    for n, m in rec.maps.items():
        assert rel_err(m, state.maps[n]) <= 1e-10, n

    ref_states = torch.randn(1, M, unet.config.cross_attention_dim, dtype=torch.float64)
    ehs = call[2].clone().requires_grad_(True)
    with ctl.subject_loss(ref_states, tokens) as sl:
        out = run(unet, (call[0], call[1], ehs, call[3]), masks)
    (out.square().mean() + sl.loss.sum()).backward()
    state.maps, state.reference_states = {}, ref_states
    ehs_ref = call[2].clone().requires_grad_(True)
    want = run(ref, (call[0], call[1], ehs_ref, call[3]), masks)
    ref_loss = torch.stack(list(state.losses.values())).mean(dim=0)
    (want.square().mean() + ref_loss.sum()).backward()
    assert rel_err(sl.loss, ref_loss) <= 1e-10
    assert rel_err(ehs.grad, ehs_ref.grad) <= 1e-9
    ctl.uninstall()


@pytest.mark.slow
def test_plus_sized_adapter_and_checkpointing(base_pipe):
    """16 image tokens (IPAdapterPlusImageProjection); gradient checkpointing, backward after the block."""
    pipe = fresh_pipe(base_pipe)
    unet = pipe.unet
    add_plus_adapter(unet)
    stock = copy.deepcopy(unet)
    ctl = install(unet)  # install() accepts IP-Adapter processors
    unet.enable_gradient_checkpointing()
    unet.train()
    call = make_call(unet, images=(1,), image_tokens=(5,))
    with torch.no_grad():
        assert rel_err(run(unet, call), run(stock, call)) <= 1e-5
    ref_states = torch.randn(1, M, unet.config.cross_attention_dim)
    losses = []
    for checkpointing in (True, False):
        unet.train(checkpointing)  # diffusers checkpoints only in training mode
        with ctl.subject_loss(ref_states, [2, 3]) as sl:
            out = run(unet, call)
        (out.square().mean() + sl.loss.sum()).backward()
        losses.append((sl.loss.detach(), [p.grad.clone() for p in unet.encoder_hid_proj.parameters()]))
        unet.zero_grad()
    assert rel_err(losses[0][0], losses[1][0]) <= 1e-6
    for a, b in zip(losses[0][1], losses[1][1]):
        assert rel_err(a, b) <= 1e-5
    ctl.uninstall()


def test_unload_and_scale_zero(base_pipe, tmp_path):
    pipe = fresh_pipe(base_pipe)
    plain = fresh_pipe(base_pipe)
    ctl = install(pipe.unet)
    load_adapters(pipe, tmp_path, kinds=("plain",))
    call = make_call(pipe.unet, images=(1,))
    text_only = (call[0], call[1], call[2], None)
    with torch.no_grad():
        want = run(plain.unet, text_only)
        pipe.set_ip_adapter_scale(0.0)  # diffusers skips an adapter whose scale is 0
        with ctl.capture([1]):
            assert rel_err(run(pipe.unet, call), want) <= 1e-5
        pipe.unload_ip_adapter()
        procs = pipe.unet.attn_processors
        assert {type(p) for k, p in procs.items() if "attn2" in k} == {AttnProcessor2_0}
        assert all(type(p) is SemfidAttnProcessor for k, p in procs.items() if "attn1" in k)
        assert rel_err(run(pipe.unet, text_only), want) <= 1e-5
        with ctl.capture([1]) as rec:  # the next block records again
            assert rel_err(run(pipe.unet, text_only), want) <= 1e-5
    assert len(rec.maps) == 16
    ctl.uninstall()
    assert {type(p) for p in pipe.unet.attn_processors.values()} == {AttnProcessor2_0}
