"""torch.compile of the SD1.5 / SDXL twins with semfid blocks active (CPU).

A compiled UNet must compile once per shape class and never again when only tensor values change:
every step below opens a *new* block with *new* reference states, a new token list of the same
length (and, for SD1.5, a new reference mask). Dynamo's compiled-graph counter must not move after
the first step (and ``error_on_recompile`` is on from then on), ``fullgraph=True`` must hold, and
losses, gradients and maps must equal the same loop run eagerly on the same UNet.

Backends. The UNet loops (both twins' training loops, the capture sampling loop) run under
inductor, ``torch.compile``'s default backend, from a cold cache: this file gets an empty
``TORCHINDUCTOR_CACHE_DIR`` of its own, so every graph is lowered and every C++ kernel generated and
built by g++ in the test (only the precompiled header torch keeps outside that directory is
reused). The kernels are inductor's default vectorised C++: the cold build of the SDXL twin's
forward + backward took 261 s at load 0.4-1.4 on the 2-core VM (1125 s at load 3-7). Scalar kernels
(``cpp.vec_isa_ok=False``) would halve g++'s time, but that switch is not safe to flip inside one
process: ``torch._inductor.cpu_vec_isa`` caches the ISA list, and later inductor compiles in the same
pytest run (``test_joint_ops``, ``test_library``) then failed to build or returned wrong numbers.

Inductor reorders fp32 sums (fused reductions, recomputed softmax / norm statistics), so compiled
and eager results differ by a few fp32 roundings per op along the UNet's depth: on the SD1.5 twin
<= 5e-7 (losses) and <= 1.1e-6 (key-state gradients) relative to the largest entry. The loops allow
1e-5: one token of the list changed moves the loss by >= 1.4e-2 and the gradient (dominated by the
denoising loss) by >= 4.7e-5.

Whether a call recompiles is Dynamo's decision (its guards), the same for every backend; the Flux
twin's loop runs under ``aot_eager`` (Dynamo + AOT autograd: the graphs inductor would get).
``SEMFID_COMPILE_TEST_BACKEND=<backend>`` runs every test under one backend.
"""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from semfid.diffusers import install
from semfid.testing.unets import unet_from_config

TWINS = {"sd15": "sd15_unet_twin", "sdxl": "sdxl_unet_twin"}
B, M, S, LATENT = 2, 9, 3, 8  # short text and a 64 px latent keep the compile cheap
STEPS = 5
BACKEND = os.environ.get("SEMFID_COMPILE_TEST_BACKEND")  # one backend for every test
LOOP_TOL = 1e-5  # compiled vs eager, relative to the largest entry (module docstring)


def twin(kind: str):
    torch.manual_seed(7)
    return unet_from_config(TWINS[kind]).eval().requires_grad_(False)


def step_inputs(unet, seed: int) -> dict:
    """A UNet call's tensors and a block's per-step values, all new for every ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    width = unet.config.cross_attention_dim

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    x = {"sample": randn(B, 4, LATENT, LATENT), "t": torch.randint(0, 1000, (B,), generator=gen),
         "states": randn(B, M, width), "reference": randn(1, M, width),
         "tokens": torch.randperm(M, generator=gen)[:S].tolist(), "kw": {}}
    mask = torch.ones(1, M)
    mask[0, 1 + seed % (M - 1)] = 0  # a different reference key masked every step
    x["ref_mask"] = mask
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text + size/crop ids
        n_time = 6 * unet.config.addition_time_embed_dim
        x["kw"]["added_cond_kwargs"] = {
            "text_embeds": randn(B, unet.config.projection_class_embeddings_input_dim - n_time),
            "time_ids": randn(B, 6)}
    return x


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def train_step(model, ctl, x, masked: bool):
    """One SeFi-IDE-style step: denoising MSE + subject loss, gradient to the key states."""
    states = x["states"].clone().requires_grad_(True)
    mask = {"ref_attention_mask": x["ref_mask"]} if masked else {}
    with ctl.subject_loss(x["reference"], x["tokens"], **mask) as rec:
        pred = model(x["sample"], x["t"], encoder_hidden_states=states, **x["kw"]).sample
    recorded = dict(rec.layer_losses)
    total = F.mse_loss(pred, torch.zeros_like(pred)) + 0.003 * rec.loss.mean()
    (grad,) = torch.autograd.grad(total, states)
    # backward (with checkpointing: a recompute of every block) recorded nothing more
    assert rec.num_calls == 1 and len(recorded) == len(ctl.layers)
    assert all(rec.layer_losses[n] is v for n, v in recorded.items())
    return rec.loss.detach(), grad


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def inductor_cache(tmp_path_factory):
    """An empty inductor cache for this file: nothing compiled before is reused."""
    cache = tmp_path_factory.mktemp("inductor-cache")
    with mock.patch.dict(os.environ, {"TORCHINDUCTOR_CACHE_DIR": str(cache)}):
        yield


def assert_close(a, b, what: str, tol: float = 1e-4):
    err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(TWINS))
def test_compiled_training_loop_never_recompiles(kind, inductor_cache, fresh_dynamo):
    """5 steps, each with a new block, reference states, token list (and reference mask): one
    compile at step 0, none after; loss and key-state gradient equal to the eager loop.

    SD1.5 runs with gradient checkpointing: traced, Dynamo must be told that the forward's side
    effects (semfid's recording) are not replayed by the recompute; eager, the recompute finds the
    layer recorded and records nothing."""
    unet = twin(kind)
    masked = checkpointing = kind == "sd15"
    if checkpointing:
        unet.enable_gradient_checkpointing()
    ctl = install(unet)
    compiled = torch.compile(unet, fullgraph=True, backend=BACKEND or "inductor")
    before = graphs()
    for step in range(STEPS):
        x = step_inputs(unet, seed=100 + step)
        with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=checkpointing,
                                        error_on_recompile=step > 0):
            loss, grad = train_step(compiled, ctl, x, masked)
        if step == 0:
            first = graphs()
            assert first > before
        assert graphs() == first, f"step {step} compiled a new graph"
        loss_eager, grad_eager = train_step(unet, ctl, x, masked)
        assert torch.isfinite(loss).all() and loss.shape == (B,)
        assert_close(loss, loss_eager, f"{kind} step {step} loss", LOOP_TOL)
        assert_close(grad, grad_eager, f"{kind} step {step} key-state gradient", LOOP_TOL)
    ctl.uninstall()


@pytest.mark.slow
def test_compiled_sampling_loop_capture_never_recompiles(inductor_cache, fresh_dynamo):
    """capture(accumulate="mean" / "list") over a compiled 3-call sampling loop, twice with new
    blocks and tokens: no graph after the first call, maps equal to the eager loop."""
    unet = twin("sd15")
    ctl = install(unet)
    compiled = torch.compile(unet, fullgraph=True, backend=BACKEND or "inductor")
    before, first = graphs(), None
    for run, accumulate in enumerate(("mean", "list")):
        x = step_inputs(unet, seed=200 + run)
        recs = []
        for model in (compiled, unet):
            sample = x["sample"]
            with torch.no_grad(), ctl.capture(x["tokens"], accumulate=accumulate) as rec:
                for i in range(3):
                    with torch._dynamo.config.patch(error_on_recompile=first is not None):
                        sample = sample - 0.1 * model(sample, x["t"] - 10 * i,
                                                      encoder_hidden_states=x["states"]).sample
                    if first is None and model is compiled:
                        first = graphs()
                        assert first > before
            recs.append(rec)
        assert graphs() == first
        got, want = recs
        assert got.num_calls == want.num_calls == 3 and len(got.maps) == 16
        for n in want.maps:
            assert_close(got.maps[n], want.maps[n], f"{accumulate} maps {n}", 1e-5)
        if accumulate == "list":
            for i in range(3):
                assert_close(got.steps[i][n], want.steps[i][n], f"step {i} maps {n}", 1e-5)

    # Traced, the range check moves to the block exit: an index >= M is clamped in the graph
    # (same shapes, no recompile) and the block raises the error naming the argument.
    with torch._dynamo.config.patch(error_on_recompile=True):
        with pytest.raises(ValueError, match=f"tokens must index the {M} text tokens"):
            with torch.no_grad(), ctl.capture([0, 1, M]):
                compiled(x["sample"], x["t"], encoder_hidden_states=x["states"])
    ctl.uninstall()


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in ("flux", "sd3") if f in os.environ.get("SEMFID_COMPILE_TEST_DITS", "flux")])
def test_compiled_dit_subject_loss_never_recompiles(family, fresh_dynamo):
    """The joint-block subject loss on the Flux twin (double and single blocks; the SD3.5 twin
    too with ``SEMFID_COMPILE_TEST_DITS=flux,sd3`` — its trace takes ~2 min more here),
    compiled with ``fullgraph=True``: every step a new block, new inputs, new reference prompt
    states and a new token list of the same length. The reference pass inside the block (one
    no-grad forward) and the per-thread flags it sets must not make step 1 recompile; loss and
    gradients equal the eager loop."""
    from _dit_calls import make_call, twin as dit_twin

    torch.manual_seed(0)
    model = dit_twin(family).train()  # dropout is 0 in the twins
    ctl = install(model)
    compiled = torch.compile(model, fullgraph=True, backend=BACKEND or "aot_eager")

    def step(fn, call, reference, tokens):
        model.zero_grad()
        with ctl.subject_loss(reference, tokens) as rec:
            out = fn(**call).sample
        (out.square().mean() + rec.loss.sum()).backward()
        return rec.loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    before = graphs()
    for n in range(3):
        gen = torch.Generator().manual_seed(300 + n)
        torch.manual_seed(300 + n)
        call = make_call(family, batch=2, text=5)
        reference = torch.randn(1, 4, 32, generator=gen)
        tokens = torch.randperm(4, generator=gen)[:2].tolist()
        with torch._dynamo.config.patch(error_on_recompile=n > 0):
            loss, grads = step(compiled, call, reference, tokens)
        if n == 0:
            first = graphs()
            assert first > before
        assert graphs() == first, f"{family} step {n} compiled a new graph"
        loss_eager, grads_eager = step(model, call, reference, tokens)
        assert torch.isfinite(loss).all() and loss.shape == (2,)
        assert_close(loss, loss_eager, f"{family} step {n} loss")
        assert len(grads) == len(grads_eager)
        for g, g_eager in zip(grads, grads_eager):
            assert_close(g, g_eager, f"{family} step {n} gradient")
    ctl.uninstall()
