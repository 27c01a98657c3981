"""Backend registry and dispatch: declared support, reasons, forced backends, SEMFID_BACKEND."""

from __future__ import annotations

import warnings

import pytest
import torch

import semfid
from semfid._inputs import XattnInputs
from semfid.backends import (
    BackendBase, _REGISTRY, available_backends, get_backend, register_backend,
    registered_backends, select_backend,
)
from semfid.backends.torch import TorchBackend


def _inp(dtype=torch.float32, M=7, D=8):
    return XattnInputs.validate(torch.randn(1, 2, 3, D, dtype=dtype), torch.randn(1, 2, M, D, dtype=dtype),
                                torch.randn(1, 2, M, D, dtype=dtype))


def test_every_backend_declares_support():
    names = [b.NAME for b in registered_backends()]
    assert {"torch", "triton", "cuda"} <= set(names)
    for b in registered_backends():
        assert b.SUPPORTED_DEVICES and b.SUPPORTED_DTYPES
        assert isinstance(b.not_supported_reasons(_inp()), list)
        assert isinstance(b.status(), str)
    assert "torch" in available_backends()


def test_auto_picks_torch_on_cpu():
    assert select_backend(_inp(), "auto") is TorchBackend


def test_explicit_backend_that_cannot_run_lists_reasons():
    with pytest.raises(ValueError) as info:
        select_backend(_inp(), "cuda")
    msg = str(info.value)
    assert "backend='cuda' was requested but cannot run these inputs" in msg
    assert "device=cpu" in msg and "dtype=torch.float32" in msg
    with pytest.raises(ValueError, match="cannot run these inputs"):
        semfid.cross_attention(*(torch.randn(1, 1, 2, 8) for _ in range(3)), backend="cuda")


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of \["):
        get_backend("nope")


class _FakeFast(BackendBase):
    """A test backend that claims to be fastest on CPU for small head dims."""

    NAME = "fake_fast"
    SUPPORTED_DEVICES = frozenset({"cpu"})
    SUPPORTED_DTYPES = frozenset({torch.float32})
    MAX_HEAD_DIM = 16
    PRIORITY = 1
    AUTO_DEVICES = frozenset({"cpu"})
    calls = 0

    @staticmethod
    def forward(*args):
        _FakeFast.calls += 1
        return TorchBackend.forward(*args)

    @staticmethod
    def backward(*args):
        return TorchBackend.backward(*args)


@pytest.fixture
def fake_backend():
    register_backend(_FakeFast)
    _FakeFast.calls = 0
    yield _FakeFast
    _REGISTRY.pop(_FakeFast.NAME)


def test_auto_takes_first_fitting_backend_and_falls_back(fake_backend):
    assert select_backend(_inp(D=8), "auto") is fake_backend
    assert select_backend(_inp(D=32), "auto") is TorchBackend  # head dim too large for it
    assert select_backend(_inp(dtype=torch.float16), "auto") is TorchBackend
    with pytest.raises(ValueError, match=r"head_dim=32 > 16"):
        select_backend(_inp(D=32), "fake_fast")
    q = torch.randn(1, 1, 3, 8)
    semfid.cross_attention(q, q, q)
    assert fake_backend.calls == 1


def test_backend_not_validated_on_device_is_not_auto(fake_backend, monkeypatch):
    monkeypatch.setattr(fake_backend, "AUTO_DEVICES", frozenset())
    assert select_backend(_inp(), "auto") is TorchBackend
    assert select_backend(_inp(), "fake_fast") is fake_backend


def test_env_var_prefers_backend_and_warns_on_fallback(fake_backend, monkeypatch):
    monkeypatch.setattr(fake_backend, "PRIORITY", 1000)  # auto alone would take torch
    assert select_backend(_inp(), "auto") is TorchBackend
    monkeypatch.setenv("SEMFID_BACKEND", "fake_fast")
    assert select_backend(_inp(), "auto") is fake_backend
    with pytest.warns(UserWarning, match=r"SEMFID_BACKEND=fake_fast cannot run some inputs"):
        assert select_backend(_inp(D=64), "auto") is TorchBackend
    # An explicit backend argument wins over the environment.
    assert select_backend(_inp(), "torch") is TorchBackend
    monkeypatch.setenv("SEMFID_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        select_backend(_inp(), "auto")


def test_backward_runs_on_the_forward_backend(fake_backend):
    q = torch.randn(1, 1, 3, 8, requires_grad=True)
    out = semfid.cross_attention(q, q, q)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out.sum().backward()
    assert fake_backend.calls == 1 and q.grad is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="describes the no-GPU case")
def test_info_says_which_path_a_cuda_tensor_takes_without_a_gpu():
    from semfid import info

    line = [l for l in info.paths() if l.strip().startswith("cuda:")][0]
    assert "auto takes 'sdpa'" in line
    gated = [b.NAME for b in registered_backends() if b.SELF_VALIDATED and b.unavailable_reason() is None]
    for name in gated:
        assert repr(name) in line and "self-test" in line


def test_memoised_choice_tells_head_mean_from_per_head_maps(fake_backend, monkeypatch):
    """A backend may refuse per-head maps only (the Triton one does on a GPU): a choice cached for
    head-mean maps must not be reused for per-head maps of the same shapes."""
    def reasons(inp):
        return [] if inp.mean_heads else ["per-head maps refused"]

    monkeypatch.setattr(fake_backend, "not_supported_reasons", staticmethod(reasons))
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    mean = XattnInputs.validate(q, k, v, select=[1, 2], head_reduce="mean")
    per_head = XattnInputs.validate(q, k, v, select=[1, 2], head_reduce="none")
    assert select_backend(mean, "auto") is fake_backend
    assert select_backend(per_head, "auto") is TorchBackend
