"""torch.library integration: opcheck on both ops, torch.compile(fullgraph=True) forward + backward."""

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
