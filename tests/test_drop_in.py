"""Every diffusers API that touches processors, on a UNet with semfid installed and no block active
(issue 25): the output equals a stock UNet that went through the same call, and the next block
records (maps equal to a fresh install's) or raises naming the layer.

The UNet is the SD1.5 structural twin (16 cross-attention layers); LoRA and save / load run on the
tiny SD1.5 pipeline (semfid.sefi.tiny). IP-Adapter: tests/test_ip_adapter.py.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0

from semfid.diffusers import SemfidAttnProcessor, install
from semfid.testing.unets import unet_from_config

LATENT = 8
M = 9
TOKENS = [1, 3]


@pytest.fixture(scope="module")
def base_unet():
    torch.manual_seed(4321)
    return unet_from_config("sd15_unet_twin").eval()


def make_call(unet, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(B, 4, LATENT, LATENT, generator=g)
    ehs = torch.randn(B, M, unet.config.cross_attention_dim, generator=g)
    return sample, torch.full((B,), 21), ehs


def run(unet, call):
    sample, t, ehs = call
    return unet(sample, t, encoder_hidden_states=ehs).sample


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def pair(base):
    """(installed UNet, its controller, stock copy)."""
    unet, stock = copy.deepcopy(base), copy.deepcopy(base)
    return unet, install(unet), stock


def fresh_maps(stock, call):
    """Maps of a fresh install on a copy of ``stock`` (the reference a block must reproduce)."""
    unet = copy.deepcopy(stock)
    ctl = install(unet)
    with torch.no_grad(), ctl.capture(TOKENS) as rec:
        run(unet, call)
    return rec.maps


def assert_records(ctl, unet, stock, call):
    with torch.no_grad(), ctl.capture(TOKENS) as rec:
        out = run(unet, call)
        want = run(stock, call)
    assert rel_err(out, want) <= 1e-5
    ref = fresh_maps(stock, call)
    assert list(rec.maps) == list(ref) and len(ref) == 16
    for n, m in rec.maps.items():
        assert rel_err(m, ref[n]) <= 1e-6, n


def test_set_default_attn_processor(base_unet):
    unet, ctl, stock = pair(base_unet)
    unet.set_default_attn_processor()  # raised diffusers' ValueError before (exact-class list)
    stock.set_default_attn_processor()
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor}
    call = make_call(unet)
    with torch.no_grad():
        assert rel_err(run(unet, call), run(stock, call)) <= 1e-6  # stock AttnProcessor math
    assert_records(ctl, unet, stock, call)  # the block put semfid's processors back
    assert all(type(p) is SemfidAttnProcessor for p in unet.attn_processors.values())
    ctl.uninstall()  # puts back what the block found: AttnProcessor
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor}


def test_set_attn_processor_adopted_or_named(base_unet):
    unet, ctl, stock = pair(base_unet)
    call = make_call(unet)
    unet.set_attn_processor(AttnProcessor2_0())
    assert_records(ctl, unet, stock, call)

    class Custom(AttnProcessor2_0):
        pass

    key = "mid_block.attentions.0.transformer_blocks.0.attn2.processor"
    unet.set_attn_processor({**dict(unet.attn_processors), key: Custom()})
    with torch.no_grad():
        assert rel_err(run(unet, call), run(stock, call)) <= 1e-5
    with pytest.raises(RuntimeError, match=r"1 layer\(s\) to record .*mid_block.attentions.0.transformer_blocks.0.attn2: Custom"):
        ctl.capture(TOKENS).__enter__()
    with torch.no_grad(), ctl.capture(TOKENS, layers=lambda n: "mid_block" not in n) as rec:
        run(unet, call)  # the other layers still record
    assert len(rec.maps) == 15
    ctl.uninstall()
    assert type(unet.attn_processors[key]) is Custom


def test_fuse_and_unfuse_qkv(base_unet):
    unet, ctl, stock = pair(base_unet)
    call = make_call(unet)
    unet.fuse_qkv_projections()
    stock.fuse_qkv_projections()
    assert {type(p) for p in unet.attn_processors.values()} == {FusedAttnProcessor2_0}
    with torch.no_grad():
        assert rel_err(run(unet, call), run(stock, call)) <= 1e-6
    with pytest.raises(RuntimeError, match="16 layer.*FusedAttnProcessor2_0.*unfuse_qkv_projections"):
        ctl.capture(TOKENS).__enter__()
    unet.unfuse_qkv_projections()  # diffusers puts back the very processors it saved: semfid's
    stock.unfuse_qkv_projections()
    assert ctl._processors_intact()
    assert_records(ctl, unet, stock, call)
    ctl.uninstall()


def test_attention_slicing(base_unet):
    unet, ctl, stock = pair(base_unet)
    call = make_call(unet)
    for u in (unet, stock):
        u.set_attention_slice("max")
    with torch.no_grad():
        assert rel_err(run(unet, call), run(stock, call)) <= 1e-6
    with pytest.raises(RuntimeError, match="SlicedAttnProcessor.*set_attention_slice"):
        ctl.subject_loss(torch.randn(1, M, unet.config.cross_attention_dim), TOKENS).__enter__()
    for u in (unet, stock):
        u.set_attention_slice(None)  # AttnProcessor2_0 everywhere: adopted by the next block
    assert_records(ctl, unet, stock, call)
    ctl.uninstall()


def test_deepcopy_is_stock_and_installable(base_unet):
    unet, ctl, stock = pair(base_unet)
    dup = copy.deepcopy(unet)  # EMA copies in training scripts; raised TypeError before
    assert {type(p) for p in dup.attn_processors.values()} == {AttnProcessor2_0}
    call = make_call(unet)
    with torch.no_grad(), ctl.capture(TOKENS) as rec:
        out = run(dup, call)  # the copy records nothing into the original's block
        run(unet, call)
    assert rec.num_calls == 1 and rel_err(out, run(stock, call)) <= 1e-6
    ctl2 = install(dup)  # the copy takes a controller of its own
    assert_records(ctl2, dup, stock, call)
    ctl2.uninstall()
    ctl.uninstall()


@pytest.mark.slow
def test_gradient_checkpointing_enabled_after_install(base_unet):
    unet, ctl, stock = pair(base_unet)
    unet.enable_gradient_checkpointing()
    unet.train()
    call = make_call(unet)
    refs = torch.randn(1, M, unet.config.cross_attention_dim)
    grads = []
    for checkpointing in (True, False):
        unet.train(checkpointing)
        ehs = call[2].clone().requires_grad_(True)
        with ctl.subject_loss(refs, TOKENS) as sl:
            out = run(unet, (call[0], call[1], ehs))
        (out.square().mean() + sl.loss.sum()).backward()  # recompute after the block has exited
        grads.append((sl.loss.detach(), ehs.grad))
    assert rel_err(grads[0][0], grads[1][0]) <= 1e-6
    assert rel_err(grads[0][1], grads[1][1]) <= 1e-5
    ctl.uninstall()


# ------------------------------------------------------------------------------------------------
# pipeline-level: LoRA and save / load
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from semfid.sefi.tiny import build_tiny_pipeline

    path = tmp_path_factory.mktemp("tiny_sd15")
    build_tiny_pipeline("sd15", path)
    return path


def load_pipe(path):
    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)


def lora_state_dict(unet, seed=0):
    """A LoRA for ``unet`` in diffusers' format, made locally with peft (random, nonzero B)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    work = copy.deepcopy(unet)
    work.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in work.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return {f"unet.{k}": v for k, v in get_peft_model_state_dict(work).items()}


@pytest.mark.slow
def test_lora_load_fuse_unload(tiny_dir):
    pytest.importorskip("peft")
    pipe, stock = load_pipe(tiny_dir), load_pipe(tiny_dir)
    ctl = install(pipe.unet)
    lora = lora_state_dict(pipe.unet)
    call = make_call(pipe.unet)
    for p in (pipe, stock):
        p.load_lora_weights(copy.deepcopy(lora), adapter_name="subject")
    assert_records(ctl, pipe.unet, stock.unet, call)
    for p in (pipe, stock):
        p.fuse_lora()
    assert_records(ctl, pipe.unet, stock.unet, call)
    for p in (pipe, stock):
        p.unfuse_lora()
        p.unload_lora_weights()
    assert_records(ctl, pipe.unet, stock.unet, call)
    ctl.uninstall()


@pytest.mark.slow
def test_pipeline_save_and_load(tiny_dir, tmp_path):
    pipe = load_pipe(tiny_dir)
    ctl = install(pipe.unet)
    pipe.save_pretrained(tmp_path / "saved")
    back = load_pipe(tmp_path / "saved")  # a stock UNet: processors are not part of a checkpoint
    assert {type(p) for p in back.unet.attn_processors.values()} == {AttnProcessor2_0}
    call = make_call(pipe.unet)
    with torch.no_grad():
        assert rel_err(run(back.unet, call), run(pipe.unet, call)) <= 1e-6
    assert_records(ctl, pipe.unet, back.unet, call)  # the saved pipeline keeps recording
    ctl.uninstall()


# ------------------------------------------------------------------------------------------------
# the pytest plugin
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_install_everywhere_plugin(tmp_path):
    (tmp_path / "test_suite.py").write_text(textwrap.dedent('''
        from diffusers import UNet2DConditionModel
        from semfid.diffusers import SemfidAttnProcessor
        from semfid.testing.unets import load_unet_config

        def test_built_models_run_semfid():
            unet = UNet2DConditionModel.from_config(load_unet_config("sd15_unet_twin"))
            assert all(type(p) is SemfidAttnProcessor for p in unet.attn_processors.values())

        def test_refused_model_stays_stock():
            unet = UNet2DConditionModel(block_out_channels=(8, 8), norm_num_groups=4,
                                        cross_attention_dim=8, attention_head_dim=2, layers_per_block=1,
                                        down_block_types=("DownBlock2D", "DownBlock2D"),
                                        up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type=None)
            assert not any(type(p) is SemfidAttnProcessor for p in unet.attn_processors.values())
    '''))
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "semfid.testing.install_everywhere",
         f"--semfid-report={report}", str(tmp_path / "test_suite.py")],
        capture_output=True, text=True, cwd=tmp_path, timeout=600, env={**os.environ, "PYTHONPATH": ""},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "models built: 2, semfid installed: 1, refused: 1" in proc.stdout
    events = json.loads(report.read_text())
    assert [e["installed"] for e in events] == ["yes", "no"]
    assert events[1]["test"].endswith("test_refused_model_stays_stock")
    assert "no attention layers whose keys include the text" in events[1]["error"]
