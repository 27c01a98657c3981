"""The whole-row GEMM attention of the torch backend's joint path on float32 CPU tensors
(semfid/backends/gemm_attention.py) and the C++ core's row kernels under it (csrc/cpu/row_exp.cpp).

The primitive is checked against the PyTorch loop (primitives.Blocked) in float64 with
flash-attention's rule (error ≤ 2x / 3x that of the same loop in float32), on odd sizes, the
layout diffusers passes ([B, N, H, D] memory), -inf keys, a (batch, head) with no key, NaN rows,
the extra row term, blocks smaller than the problem, and with oneDNN's matmul off.
"""

from __future__ import annotations

import pytest
import torch

import semfid
from semfid import _cpu_core
from semfid.backends import gemm_attention, torch as torch_backend
from semfid.backends.gemm_attention import GemmCpu
from semfid.backends.primitives import Blocked, FusedCpu
from semfid.testing import assert_close_rule, subject_ref, ulp_atol

CORE = _cpu_core.module()
pytestmark = pytest.mark.skipif(CORE is None or not hasattr(CORE, "softmax_rows_"),
                                reason="the C++ CPU core (semfid._cpu_ops) is not built")

B, H, N, M, D, W = 2, 3, 37, 53, 24, 19


def _problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, H, D, generator=gen).transpose(1, 2)  # diffusers' layout
    k = torch.randn(B, M, H, D, generator=gen).transpose(1, 2)
    v = torch.randn(B, H, M, W, generator=gen)
    bias = torch.zeros(B, H, M)
    bias[0, :, 5:20] = float("-inf")
    bias[1, 1] = float("-inf")  # no key for every query of this (batch, head)
    dout = torch.randn(B, H, N, W, generator=gen)
    dout[1, 1] = 0  # the contract: rows without keys get no out gradient
    extra = torch.randn(B, H, N, generator=gen)
    extra[1, 1] = 0
    return q, k, v, bias, dout, extra


def _check_against_loop(scale: float = 0.37, seed: int = 0) -> None:
    q, k, v, bias, dout, extra = _problem(seed)
    out, lse = GemmCpu.attend(q, k, v, bias, scale)
    grads = GemmCpu.attend_backward_delta(q, k, v, bias, scale, out, lse, dout, extra)
    as64 = [t.double() for t in (q, k, v, bias)]
    out64, lse64 = Blocked.attend(*as64, scale)
    grads64 = Blocked.attend_backward_delta(*as64, scale, out64, lse64, dout.double(), extra.double())
    out32, lse32 = Blocked.attend(q, k, v, bias, scale)
    grads32 = Blocked.attend_backward_delta(q, k, v, bias, scale, out32, lse32, dout, extra)

    dead = torch.isinf(lse64)
    assert dead[1, 1].all() and dead.sum() == N
    assert torch.equal(torch.isposinf(lse), dead) and not out[1, 1].any()
    finite = ~dead
    assert_close_rule("out", out, out64, out32, atol=ulp_atol(torch.float32))
    assert_close_rule("lse", lse[finite], lse64[finite], lse32[finite], atol=ulp_atol(torch.float32, 4))
    for name, g, g64, g32 in zip(("dq", "dk", "dv"), grads, grads64, grads32):
        assert g.dtype == torch.float32 and g.shape == g64.shape
        assert_close_rule(name, g, g64, g32, factor=3.0, atol=ulp_atol(torch.float32, 4))


def test_matches_the_float64_loop_on_odd_sizes():
    _check_against_loop()


def test_blocks_smaller_than_the_problem(monkeypatch):
    """16-row / 16-key blocks: several blocks per (batch, head), the last one ragged."""
    monkeypatch.setattr(gemm_attention, "BLOCK_ELEMENTS", 16)
    _check_against_loop(seed=1)


def test_without_onednn_the_products_are_torch_mm(monkeypatch):
    monkeypatch.setattr(gemm_attention, "_onednn_checked", True)
    monkeypatch.setattr(gemm_attention, "_onednn_reason", "off for this test")

    def refuse(x, w):
        raise AssertionError("oneDNN called although its check failed")

    monkeypatch.setattr(gemm_attention, "_onednn_linear", refuse)
    _check_against_loop(seed=2)


def test_onednn_check_refuses_a_wrong_or_missing_matmul(monkeypatch):
    monkeypatch.setattr(gemm_attention, "_onednn_checked", False)
    monkeypatch.setattr(gemm_attention, "_onednn_linear", lambda x, w: (x @ w.t()).bfloat16().float())
    assert "off by" in gemm_attention.onednn_reason()
    monkeypatch.setattr(gemm_attention, "_onednn_checked", False)
    monkeypatch.setenv(gemm_attention.ENV_VAR, "0")
    assert "disabled" in gemm_attention.onednn_reason()
    monkeypatch.setattr(gemm_attention, "_onednn_checked", False)
    monkeypatch.delenv(gemm_attention.ENV_VAR)

    def broken(x, w):
        raise RuntimeError("no primitive")

    monkeypatch.setattr(gemm_attention, "_onednn_linear", broken)
    assert "failed" in gemm_attention.onednn_reason()


def test_nan_rows_stay_nan_and_empty_shapes():
    q, k, v, _, dout, _ = _problem(3)
    q = q.clone()
    q[0, 2, 4, 1] = float("nan")
    out, lse = GemmCpu.attend(q, k, v, None, 0.2)
    assert torch.isnan(out[0, 2, 4]).all() and torch.isnan(lse[0, 2, 4])
    out[0, 2, 4], lse[0, 2, 4] = 0, 0
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    dq, _, _ = GemmCpu.attend_backward(q, k, v, None, 0.2, *GemmCpu.attend(q, k, v, None, 0.2), dout)
    assert torch.isnan(dq[0, 2, 4]).any()
    out, lse = GemmCpu.attend(q, k[:, :, :0], v[:, :, :0], None, 0.2)
    assert not out.any() and torch.isposinf(lse).all()
    grads = GemmCpu.attend_backward(q[:, :, :0], k, v, None, 0.2, out[:, :, :0], lse[:, :, :0],
                                    dout[:, :, :0])
    assert [tuple(g.shape) for g in grads] == [(B, H, 0, D), (B, H, M, D), (B, H, M, W)]


def test_row_kernels_against_torch():
    gen = torch.Generator().manual_seed(4)
    s = torch.randn(21, 67, generator=gen) * 6
    bias = torch.randn(67, generator=gen)
    bias[3] = float("-inf")
    s[5] = float("-inf")  # a row without keys
    s[7, 9] = float("nan")
    got = s.clone()
    lse, inv = CORE.softmax_rows_(got, bias)
    logits = s + bias  # the kernel's float32 steps; exp itself is compared in float64
    m = logits.amax(dim=-1, keepdim=True).nan_to_num(neginf=0.0)
    want = torch.exp((logits - m).double())
    ref = logits.double()
    ok = [r for r in range(21) if r not in (5, 7)]
    torch.testing.assert_close(got[ok].double(), want[ok], rtol=3e-7, atol=1e-37)
    torch.testing.assert_close(lse[ok].double(), torch.logsumexp(ref[ok], dim=-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(inv[ok].double(), 1 / want[ok].sum(dim=-1), rtol=1e-6, atol=0.0)
    assert not got[5].any() and torch.isposinf(lse[5]) and inv[5] == 0
    assert torch.isnan(lse[7]) and torch.isnan(got[7, 9])

    row_bias = torch.randn(21, generator=gen)
    x = torch.randn(21, 67, generator=gen) * 6
    # as lse: at least every logit of its column (the kernel's exp takes arguments <= 0)
    col_sub = (x + row_bias[:, None]).amax(dim=0) + torch.rand(67, generator=gen)
    col_sub[2] = float("inf")  # a query without keys
    got = x.clone()
    CORE.exp_rows_cols_(got, row_bias, col_sub)
    want = torch.exp(((x + row_bias[:, None]) - col_sub).double())
    torch.testing.assert_close(got.double(), want, rtol=3e-7, atol=1e-37)
    assert not got[:, 2].any()

    p, dp, delta = torch.rand(21, 67, generator=gen), torch.randn(21, 67, generator=gen), torch.randn(67, generator=gen)
    got = dp.clone()
    CORE.softmax_grad_cols_(got, p, delta)
    torch.testing.assert_close(got, p * (dp - delta))

    with pytest.raises(RuntimeError, match="contiguous 2-D float32"):
        CORE.softmax_rows_(s.t(), None)
    with pytest.raises(RuntimeError, match="col_sub"):
        CORE.exp_rows_cols_(x.clone(), None, col_sub[:5])


def test_joint_path_takes_it_for_float32_cpu_with_wide_heads_only():
    q = torch.randn(1, 2, 5, gemm_attention.MIN_HEAD_DIM)
    assert torch_backend._kernels(q) is GemmCpu
    assert torch_backend._kernels(q.double()) is FusedCpu
    assert torch_backend._kernels(q.bfloat16()) is FusedCpu
    assert torch_backend._kernels(q[..., :-1]) is FusedCpu


def test_subject_op_fp32_matches_reference_with_masked_rows_and_zero_out_gradients(monkeypatch):
    """The joint subject op on the torch backend (fp32 CPU: this primitive) with a batch row whose
    keys are all -inf, map rows whose out gradient is exactly 0 and the reference not detached."""
    monkeypatch.setattr(gemm_attention, "MIN_HEAD_DIM", 0)
    calls = []
    attend = GemmCpu.attend
    monkeypatch.setattr(GemmCpu, "attend", staticmethod(lambda *a: calls.append(1) or attend(*a)))
    gen = torch.Generator().manual_seed(5)
    Bq, Hq, T, I, Dq = 2, 3, 7, 29, 16
    q, k, v = (torch.randn(Bq, T + I, Hq, Dq, generator=gen).transpose(1, 2) for _ in range(3))
    k_ref = torch.randn(Bq, Hq, 9, Dq, generator=gen)
    bias = torch.zeros(Bq, T + I)
    bias[0, 5] = float("-inf")
    bias[1] = float("-inf")
    kw = dict(tokens=[1, 4], ref_tokens=[2, 8], attn_bias=bias, map_queries=(T, T + I),
              ref_segment=(0, T), detach_reference=False, return_maps=True, head_reduce="none")
    dout = torch.randn(Bq, Hq, T + I, Dq, generator=gen)
    dout[:, :, T + 3:T + 6] = 0
    dout[1] = 0

    def run(dtype, fn, **extra):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, k_ref)]
        got = fn(*leaves, **kw, **extra)
        cot = [dout.to(dtype), torch.ones(Bq, dtype=dtype), torch.zeros_like(got[2])]
        return got, torch.autograd.grad(got, leaves, cot, allow_unused=True)

    got, got_grads = run(torch.float32, semfid.subject_attention, backend="torch")
    assert calls  # the op ran through this primitive
    ref, ref_grads = run(torch.float64, subject_ref)
    plain, plain_grads = run(torch.float32, subject_ref, upcast=False)
    assert not got[0][1].any() and not got[2][1].any()
    for name, g, r, p in zip(("out", "loss", "maps"), got, ref, plain):
        assert_close_rule(name, g, r, p, atol=ulp_atol(torch.float32))
    for name, g, r, p in zip(("dq", "dk", "dv", "dk_ref"), got_grads, ref_grads, plain_grads):
        assert_close_rule(name, g, r, p, factor=3.0, atol=ulp_atol(torch.float32, 4))
