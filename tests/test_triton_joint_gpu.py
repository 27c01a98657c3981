"""The key-blocked Triton kernels (joint key sets) on a real GPU: DiT layers against float64.

Skipped (with a reason) without CUDA or triton; ``benchmarks/gpu_check.sh`` runs it with ``-m gpu``.
Shapes: a Flux.1 double-stream layer at 1024 px ([512 text, 4096 image] keys, 24 x 128, B = 1),
SD3's [image, 333 text] at 24 x 64 and PixArt-Σ's 300-key cross-attention at 16 x 72; maps over
the image queries, the reference replacing the text keys. Flash-attention's rule as everywhere.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from semfid.testing import assert_close_rule, attention_ref, subject_ref, ulp_atol

import semfid

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="TRITON_INTERPRET=1 replaces the GPU compiler"),
]

# (name, H, D, text, image, text_first)
LAYERS = [("flux", 24, 128, 512, 4096, True), ("sd3", 24, 64, 333, 4096, False), ("pixart", 16, 72, 300, 4096, None)]


def _layer(H, D, text, image, text_first, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    joint = text_first is not None
    N, M = (text + image, text + image) if joint else (image, text)

    def rand(n):  # diffusers layout: [B, n, H, D] memory seen as [B, H, n, D]
        return torch.randn(1, n, H, D, device="cuda", generator=g).to(dtype).transpose(1, 2).requires_grad_()

    t0 = 0 if (not joint or text_first) else image
    rows = ((text, text + image) if text_first else (0, image)) if joint else None
    seg = (t0, t0 + text) if joint else None
    tokens = torch.tensor([[t0 + 3, t0 + 7, t0 + 11, t0 + 12]], device="cuda")
    return rand(N), rand(M), rand(M), rand(text + 9), tokens, rows, seg


@pytest.mark.parametrize("layer", LAYERS, ids=lambda x: x[0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
def test_joint_subject_layer_matches_reference(layer, dtype):
    _, H, D, text, image, text_first = layer
    q, k, v, k_ref, tokens, rows, seg = _layer(H, D, text, image, text_first, dtype)
    kw = dict(tokens=tokens, ref_tokens=tokens, head_reduce="mean", detach_reference=False, return_maps=True,
              map_queries=rows, ref_segment=seg)
    got = semfid.subject_attention(q, k, v, k_ref, backend="triton", **kw)
    ref = subject_ref(q, k, v, k_ref, **kw)
    plain = subject_ref(q, k, v, k_ref, upcast=False, **kw)
    scale = max(float(r.abs().max()) for r in ref) + 1e-3
    for name, a, r, p in zip(("out", "loss", "maps"), got, ref, plain):
        assert_close_rule(name, a, r, p, atol=ulp_atol(dtype, scale))
    ws = [torch.randn_like(r) for r in ref]

    def total(outs):
        return sum((o.double() * w).sum() for o, w in zip(outs, ws))

    inputs = (q, k, v, k_ref)
    grads = torch.autograd.grad(total(got), inputs)
    gref = torch.autograd.grad(total(ref), inputs)
    gplain = torch.autograd.grad(total(plain), inputs)
    for name, a, r, p in zip(("dq", "dk", "dv", "dk_ref"), grads, gref, gplain):
        assert_close_rule(name, a, r, p, factor=3.0, atol=ulp_atol(dtype, float(r.abs().max()) + 1e-3))


def test_joint_cross_attention_and_determinism():
    q, k, v, _, tokens, rows, _ = _layer(24, 128, 512, 4096, True, torch.bfloat16, seed=1)
    kw = dict(select=tokens, head_reduce="none", map_queries=rows)
    out, maps = semfid.cross_attention(q, k, v, backend="triton", **kw)
    ref, plain = attention_ref(q, k, v, **kw), attention_ref(q, k, v, upcast=False, **kw)
    for name, a, r, p in zip(("out", "maps"), (out, maps), ref, plain):
        assert_close_rule(name, a, r, p, atol=ulp_atol(torch.bfloat16, 1.0))
    w = (torch.randn_like(out), torch.randn_like(maps))
    first = torch.autograd.grad((out * w[0]).sum() + (maps * w[1]).sum(), (q, k, v))
    for _ in range(5):  # one program per tile: no atomics, no tuning, the same bits every run
        out2, maps2 = semfid.cross_attention(q, k, v, backend="triton", **kw)
        again = torch.autograd.grad((out2 * w[0]).sum() + (maps2 * w[1]).sum(), (q, k, v))
        assert all(torch.equal(a, b) for a, b in zip(first, again))
