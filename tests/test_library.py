"""torch.library integration: opcheck on every op, torch.compile(fullgraph=True) forward + backward
(aot_eager and inductor), with contiguous inputs and with diffusers' transposed views."""

from __future__ import annotations

import pytest
import torch

import semfid
from conftest import backends_under_test, device_under_test

DEVICE = device_under_test()
BACKENDS = backends_under_test()


def _inputs(with_v=True, with_bias=True, with_select=True, mean_heads=True):
    B, H, N, M, D = 2, 3, 9, 7, 8
    q = torch.randn(B, H, N, D, device=DEVICE, requires_grad=True)
    k = torch.randn(B, H, M, D, device=DEVICE, requires_grad=True)
    v = torch.randn(B, H, M, 5, device=DEVICE, requires_grad=True) if with_v else None
    bias = torch.zeros(B, H, M, device=DEVICE)
    bias[0, :, -2:] = -10000.0
    select = torch.tensor([[1, 2], [6, 6]], device=DEVICE)
    return (q, k, v, bias if with_bias else None, select if with_select else None, 0.3, mean_heads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["full", "no_select", "maps_only", "no_bias_per_head"])
def test_opcheck_forward(backend, variant):
    flags = {
        "full": dict(),
        "no_select": dict(with_select=False),
        "maps_only": dict(with_v=False),
        "no_bias_per_head": dict(with_bias=False, mean_heads=False),
    }[variant]
    args = _inputs(**flags) + (backend,)
    torch.library.opcheck(torch.ops.semfid.xattn_fwd.default, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_backward(backend):
    q, k, v, bias, select, scale, mean_heads = _inputs()
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse, maps = torch.ops.semfid.xattn_fwd(q, k, v, bias, select, scale, mean_heads, backend)
    args = (q, k, v, bias, select, scale, mean_heads, out, lse, torch.randn_like(out),
            torch.randn_like(maps), backend)
    torch.library.opcheck(torch.ops.semfid.xattn_bwd.default, args)


def _diffusers_view(B, N, H, D, requires_grad=False):
    """[B, H, N, D] as diffusers hands it over: a transposed view of a [B, N, H*D] projection."""
    x = torch.randn(B, N, H * D, device=DEVICE).view(B, N, H, D).transpose(1, 2)
    return x.detach().requires_grad_(requires_grad) if requires_grad else x


def _subject_args(layout, mean_heads, detach, return_maps, ragged, with_bias):
    B, H, N, M, M_ref, D = 2, 3, 9, 7, 6, 8
    make = _diffusers_view if layout == "diffusers" else (lambda b, n, h, d: torch.randn(b, h, n, d, device=DEVICE))
    q, k, v, k_ref = make(B, N, H, D), make(B, M, H, D), make(B, M, H, D), make(B, M_ref, H, D)
    bias = torch.zeros(B, H, M, device=DEVICE)
    bias[0, :, -2:] = -10000.0
    ref_bias = torch.zeros(B, H, M_ref, device=DEVICE)
    ref_bias[1, 0, :] = float("-inf")
    tokens = torch.tensor([[1, 2, 2], [6, 0, 0]], device=DEVICE)
    ref_tokens = torch.tensor([[0, 1, 5], [3, 3, 3]], device=DEVICE)
    weights = torch.tensor([[1 / 3] * 3, [1.0, 0.0, 0.0]], device=DEVICE) if ragged else None
    return (q, k, v, k_ref, bias if with_bias else None, ref_bias if with_bias else None, tokens,
            ref_tokens, weights, 0.3, mean_heads, detach, return_maps)


SUBJECT_VARIANTS = {
    "mean_detached": dict(mean_heads=True, detach=True, return_maps=False, ragged=False, with_bias=True),
    "mean_attached_maps": dict(mean_heads=True, detach=False, return_maps=True, ragged=True, with_bias=True),
    "per_head_detached": dict(mean_heads=False, detach=True, return_maps=True, ragged=False, with_bias=False),
    "per_head_attached": dict(mean_heads=False, detach=False, return_maps=False, ragged=True, with_bias=True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "diffusers"])
@pytest.mark.parametrize("variant", sorted(SUBJECT_VARIANTS))
def test_opcheck_subject(backend, layout, variant):
    args = _subject_args(layout, **SUBJECT_VARIANTS[variant])
    try:
        fwd = torch.ops.semfid.subject_fwd(*args, backend)
    except Exception as exc:  # a backend without the op is skipped with its reason
        pytest.skip(f"{backend}: {exc}")
    torch.library.opcheck(torch.ops.semfid.subject_fwd.default, args + (backend,))
    out, lse, lse_ref, loss, maps, diff = fwd
    dmaps = torch.randn_like(maps) if args[-1] else None
    bwd_args = args[:-1] + (out, lse, lse_ref, diff, torch.randn_like(out), torch.randn_like(loss),
                            dmaps, backend)
    torch.library.opcheck(torch.ops.semfid.subject_bwd.default, bwd_args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_with_diffusers_views(backend):
    q = _diffusers_view(2, 9, 3, 8)
    k, v = _diffusers_view(2, 7, 3, 8), _diffusers_view(2, 7, 3, 8)
    select = torch.tensor([[1, 2], [6, 6]], device=DEVICE)
    args = (q, k, v, None, select, 0.3, True, backend)
    torch.library.opcheck(torch.ops.semfid.xattn_fwd.default, args)
    out, lse, maps = torch.ops.semfid.xattn_fwd(*args)
    torch.library.opcheck(torch.ops.semfid.xattn_bwd.default,
                          args[:-1] + (out, lse, torch.randn_like(out), torch.randn_like(maps), backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "diffusers"])
@pytest.mark.parametrize("compiler", ["inductor", "aot_eager"])
def test_compile_every_op_with_layouts(backend, layout, compiler):
    """What a user's compiled training step does: every public op on the layout diffusers hands
    over, inside torch.compile(fullgraph=True) with the default (inductor) backend, forward and
    backward, against the same step run eagerly."""
    torch._dynamo.reset()
    B, H, N, M, D = 2, 2, 11, 7, 8
    if layout == "diffusers":
        shapes = [(B, n, H, D) for n in (N, M, M, M)]
        base = [torch.randn(b, n, h * d, device=DEVICE) for (b, n, h, d) in shapes]
        views = lambda ts: [t.view(b, n, h, d).transpose(1, 2) for t, (b, n, h, d) in zip(ts, shapes)]
    else:
        base = [torch.randn(B, H, n, D, device=DEVICE) for n in (N, M, M, M)]
        views = lambda ts: list(ts)
    bias = torch.zeros(B, 1, M, device=DEVICE)
    bias[1, :, -3:] = float("-inf")

    def step(*leaves):
        q, k, v, k_ref = views(leaves)
        out, maps = semfid.cross_attention(q, k, v, attn_bias=bias, select=[1, 3], backend=backend)
        out2, loss, maps_t = semfid.subject_attention(q, k, v, k_ref, tokens=[1, 3], backend=backend,
                                                      detach_reference=False, return_maps=True)
        maps_only = semfid.attention_maps(q, k_ref, select=[[2], [0]], head_reduce="none", backend=backend)
        merged = out2.transpose(1, 2).reshape(B, N, H * D)  # the processor's merge of heads
        return (out.square().sum() + maps.sum() + loss.sum() + merged.mean() + maps_t.square().sum()
                + maps_only.sum())

    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    leaves_c = [t.clone().requires_grad_() for t in base]
    leaves_e = [t.clone().requires_grad_() for t in base]
    val_c = compiled(*leaves_c)
    val_e = step(*leaves_e)
    val_c.backward()
    val_e.backward()
    torch.testing.assert_close(val_c, val_e)
    for a, b in zip(leaves_c, leaves_e):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_forward_backward(backend):
    torch._dynamo.reset()
    B, H, N, M, D = 2, 2, 11, 7, 8
    tensors = [torch.randn(B, H, n, D, device=DEVICE) for n in (N, M, M, M)]
    bias = torch.zeros(B, 1, M, device=DEVICE)
    bias[1, :, -3:] = float("-inf")

    def step(q, k, v, k_ref):
        out, maps = semfid.cross_attention(q, k, v, attn_bias=bias, select=[1, 3],
                                           backend=backend)
        out2, loss = semfid.subject_attention(q, k, v, k_ref, tokens=[1, 3], backend=backend)
        return (out.square().sum() + maps.sum() + loss.sum() + out2.mean())

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves_c = [t.clone().requires_grad_() for t in tensors]
    leaves_e = [t.clone().requires_grad_() for t in tensors]
    val_c = compiled(*leaves_c)
    val_e = step(*leaves_e)
    val_c.backward()
    val_e.backward()
    torch.testing.assert_close(val_c, val_e)
    for a, b in zip(leaves_c[:3], leaves_e[:3]):
        torch.testing.assert_close(a.grad, b.grad)


def test_torch_compile_fullgraph_in_a_fresh_process():
    """The first semfid call ever made may happen while Dynamo traces: backend availability
    (which imports triton / semfid._C) must not break the graph."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch, semfid
        def step(q, k, v):
            out, maps = semfid.cross_attention(q, k, v, select=[1, 3])
            return out.sum() + maps.sum()
        x = [torch.randn(1, 2, 5, 8, requires_grad=True) for _ in range(3)]
        torch.compile(step, fullgraph=True, backend="aot_eager")(*x).backward()
        print("ok")
    """)
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
