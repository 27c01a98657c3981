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
from semfid.testing.dit_layers import DIT_LAYERS, dit_layer

import semfid

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="TRITON_INTERPRET=1 replaces the GPU compiler"),
]

LAYERS = list(DIT_LAYERS)  # flux, sd3, pixart (semfid.testing.dit_layers)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
def test_joint_subject_layer_matches_reference(layer, dtype):
    q, k, v, k_ref, tokens, rows, seg = dit_layer(layer, dtype)
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
    q, k, v, _, tokens, rows, _ = dit_layer("flux", torch.bfloat16, seed=1)
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
