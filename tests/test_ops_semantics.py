"""Edge semantics of the ops on every backend: masking, NaN, strides, detach, float64 gradcheck."""

from __future__ import annotations

import pytest
import torch

import semfid
from semfid.testing import attention_ref, subject_ref
from conftest import backends_under_test, device_under_test
from semfid.backends import get_backend

DEVICE = device_under_test()
BACKENDS = backends_under_test()



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_value", [float("-inf"), -10000.0], ids=["neg_inf", "neg_10000"])
def test_padding_bias_equals_truncation(backend, mask_value):
    """Masking the last keys equals dropping them (diffusers' own check)."""
    B, H, N, M, D = 2, 3, 19, 9, 16
    q, k, v = (torch.randn(B, H, n, D, device=DEVICE) for n in (N, M, M))
    bias = torch.zeros(B, 1, M, device=DEVICE)
    bias[:, :, 6:] = mask_value
    select = [0, 3, 5]
    out, maps = semfid.cross_attention(q, k, v, attn_bias=bias, select=select, backend=backend)
    out_t, maps_t = semfid.cross_attention(q, k[:, :, :6], v[:, :, :6], select=select, backend=backend)
    torch.testing.assert_close(out, out_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps, maps_t, rtol=1e-5, atol=1e-6)
    keep_all = semfid.cross_attention(q, k, v, attn_bias=torch.zeros(B, 1, M, device=DEVICE),
                                      backend=backend)
    torch.testing.assert_close(keep_all, semfid.cross_attention(q, k, v, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_row_gives_zeros_and_zero_grads(backend):
    B, H, N, M, D = 2, 2, 5, 7, 8
    q, k, v = (torch.randn(B, H, n, D, device=DEVICE, requires_grad=True) for n in (N, M, M))
    bias = torch.zeros(B, M, device=DEVICE)
    bias[1] = float("-inf")  # every key of batch item 1 masked
    out, maps = semfid.cross_attention(q, k, v, attn_bias=bias, select=[1, 2], backend=backend)
    assert torch.isfinite(out).all() and torch.isfinite(maps).all()
    assert (out[1] == 0).all() and (maps[1] == 0).all()
    (out.sum() + maps.sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert (t.grad[1] == 0).all()
    ref_out, ref_maps = attention_ref(q.double(), k.double(), v.double(), attn_bias=bias,
                                      select=[1, 2])
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_input_propagates_without_crashing(backend):
    q, k, v = (torch.randn(1, 2, n, 8, device=DEVICE, requires_grad=True) for n in (4, 5, 5))
    with torch.no_grad():
        q[0, 0, 2, 3] = float("nan")
    out, maps = semfid.cross_attention(q, k, v, select=[0], head_reduce="none", backend=backend)
    assert torch.isnan(out[0, 0, 2]).all() and torch.isnan(maps[0, 0, 2]).all()
    assert torch.isfinite(out[0, 1]).all() and torch.isfinite(out[0, 0, :2]).all()
    (out.sum() + maps.sum()).backward()
    assert torch.isnan(q.grad[0, 0, 2]).any()


def test_nan_screen_skips_only_nan_free_inputs():
    """The sdpa path's NaN screen (one sum per tensor) lets through only inputs without NaN: an
    inf, or a sum that overflows, goes to the exact row check."""
    from semfid.backends.base import may_hold_nan

    x = torch.randn(2, 3, 5, 4)
    assert not may_hold_nan(x, x.transpose(1, 2))
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[1, 2, 3, 1] = bad
        assert may_hold_nan(x, y)
    assert may_hold_nan(torch.full((4, 4), 60000.0, dtype=torch.float16))  # finite, sum overflows


@pytest.mark.parametrize("backend", BACKENDS)
def test_any_strides(backend):
    """q from a [B, N, H, D] projection (diffusers' layout), k/v transposed and sliced."""
    B, N, H, M, D = 2, 23, 4, 11, 24
    q = torch.randn(B, N, H, D, device=DEVICE).transpose(1, 2)
    k = torch.randn(B, M, H, 2 * D, device=DEVICE).transpose(1, 2)[..., ::2]
    v = torch.randn(B, H, D, M, device=DEVICE).transpose(-1, -2)
    select = torch.tensor([[1, 2], [3, 3]], device=DEVICE)
    out, maps = semfid.cross_attention(q, k, v, select=select, backend=backend)
    ref_out, ref_maps = attention_ref(q.double(), k.double(), v.double(), select=select)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(maps.double(), ref_maps, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_detach_reference_blocks_only_the_reference_path(backend):
    B, H, N, M, D = 2, 2, 9, 6, 8
    q, k, v, k_ref = (torch.randn(B, H, n, D, device=DEVICE, requires_grad=True)
                      for n in (N, M, M, M))
    _, loss = semfid.subject_attention(q, k, v, k_ref, tokens=[1, 4], backend=backend)
    loss.sum().backward()
    assert k_ref.grad is None
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad.abs().sum() > 0
    # q's gradient equals the reference with A_r treated as a constant.
    q64, k64, v64, kr64 = (t.detach().double().requires_grad_() for t in (q, k, v, k_ref))
    _, ref_loss = subject_ref(q64, k64, v64, kr64, tokens=[1, 4])
    ref_loss.sum().backward()
    torch.testing.assert_close(q.grad.double(), q64.grad, rtol=1e-4, atol=1e-7)
    assert kr64.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_select_none_returns_tensor_and_equals_sdpa(backend):
    q, k, v = (torch.randn(2, 3, n, 16, device=DEVICE) for n in (10, 7, 7))
    out = semfid.cross_attention(q, k, v, backend=backend)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [b for b in BACKENDS
                                     if torch.float64 in get_backend(b).SUPPORTED_DTYPES])
@pytest.mark.parametrize("head_reduce", ["mean", "none"])
def test_gradcheck_float64(backend, head_reduce):
    B, H, N, M, D = 2, 2, 5, 4, 3
    q, k, v, k_ref = (torch.randn(B, H, n, D, device=DEVICE, dtype=torch.float64,
                                  requires_grad=True) for n in (N, M, M, M + 1))
    bias = torch.zeros(B, 1, M, device=DEVICE, dtype=torch.float64)
    bias[0, 0, -1] = float("-inf")
    select = torch.tensor([[0, 2, 2], [3, 1, 0]], device=DEVICE)

    def xattn(q, k, v):
        return semfid.cross_attention(q, k, v, attn_bias=bias, select=select,
                                      head_reduce=head_reduce, backend=backend)

    def subject(q, k, v, k_ref):
        return semfid.subject_attention(q, k, v, k_ref, tokens=select, ref_tokens=[0, 1, 4],
                                        head_reduce=head_reduce, detach_reference=False,
                                        backend=backend)

    assert torch.autograd.gradcheck(xattn, (q, k, v))
    assert torch.autograd.gradcheck(subject, (q, k, v, k_ref))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_query_sequence(backend):
    q = torch.randn(2, 3, 0, 8, device=DEVICE)
    k, v = torch.randn(2, 3, 5, 8, device=DEVICE), torch.randn(2, 3, 5, 4, device=DEVICE)
    out, maps = semfid.cross_attention(q, k, v, select=[1], backend=backend)
    assert out.shape == (2, 3, 0, 4) and maps.shape == (2, 0, 1)
