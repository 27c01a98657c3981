"""The C++ CPU core of the torch backend's subject op (csrc/cpu/subject_core.cpp, semfid._cpu_ops).

It is a port of the Python implementation in semfid/backends/torch.py: on every branch (head mean or
per head, detached or not, ragged rows, maps returned, padded reference keys, masked and fully
masked rows, several chunks, half precision) the two must agree bit for bit, with the same layouts.
The float64-reference suite (test_ops_reference.py) runs the core through the public API; its
Python twin is checked against float64 here too, since CPU calls otherwise never reach it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import semfid
from semfid import _cpu_core
from semfid.backends import torch as torch_backend
from semfid.backends.base import empty_subject_outputs
from semfid._inputs import SubjectInputs
from semfid.testing import subject_ref

from csrc.cpu_build import optional_build_ext
from test_ops_reference import CASES, test_subject_attention_matches_reference

CORE = _cpu_core.module()
needs_core = pytest.mark.skipif(CORE is None, reason=f"semfid._cpu_ops: {_cpu_core.status()}")


@dataclass(frozen=True)
class Branch:
    name: str
    dtype: torch.dtype = torch.float32
    head_reduce: str = "mean"
    detach: bool = True
    return_maps: bool = False
    ragged: bool = False
    M_ref: int = 77
    bias: str = "none"  # none | pad | dead (every key of batch row 1 masked)
    chunk: Optional[int] = None  # force chunks of this many query rows
    N: int = 37
    grads: str = "both"  # both | loss (out unused) | maps (only the maps get a gradient)


BRANCHES = [
    Branch("default"),
    Branch("per_head", head_reduce="none"),
    Branch("not_detached", detach=False),
    Branch("per_head_not_detached", head_reduce="none", detach=False),
    Branch("maps", return_maps=True),
    Branch("maps_only_grad", return_maps=True, grads="maps"),
    Branch("loss_only_grad", grads="loss"),
    Branch("ragged", ragged=True),
    Branch("ragged_per_head_maps", ragged=True, head_reduce="none", return_maps=True),
    Branch("shorter_reference", M_ref=61, detach=False),
    Branch("longer_reference", M_ref=90),
    Branch("padding_bias", bias="pad", detach=False),
    Branch("dead_rows", bias="dead", head_reduce="none"),
    Branch("chunked", chunk=7, detach=False, return_maps=True),
    Branch("chunked_narrow_values", chunk=5),
    Branch("float16", dtype=torch.float16, detach=False),
    Branch("bfloat16", dtype=torch.bfloat16, head_reduce="none"),
    Branch("float64", dtype=torch.float64, return_maps=True, detach=False),
    Branch("no_queries", N=0, detach=False, return_maps=True),
    Branch("no_queries_per_head", N=0, head_reduce="none"),
]


def _run(branch: Branch, use_core: bool, monkeypatch) -> list:
    """Outputs and gradients of one subject_attention call on diffusers-layout inputs."""
    monkeypatch.setattr(torch_backend, "USE_CPU_CORE", use_core)
    if branch.chunk is not None:
        monkeypatch.setattr(torch_backend, "_BLOCK_ELEMENTS", 1)
        monkeypatch.setattr(torch_backend, "_MIN_CHUNK", branch.chunk)
    gen = torch.Generator().manual_seed(7)
    B, H, N, M, D = 2, 3, branch.N, 77, 8 if branch.chunk != 5 else 4

    def views(L: int, grad: bool) -> torch.Tensor:  # [B, H, L, D] over [B, L, H·D] memory
        x = torch.randn(B, L, H * D, generator=gen).to(branch.dtype)
        return x.view(B, L, H, D).transpose(1, 2).detach().requires_grad_(grad)

    q, k, v, k_ref = views(N, True), views(M, True), views(M, True), views(branch.M_ref, True)
    tokens = [[1, 2, 3], [4, 60]] if branch.ragged else [1, 2, 60]
    ref_tokens = [[0, 5, 6], [3, 9]] if branch.ragged else [0, 5, 9]
    bias = None
    if branch.bias != "none":
        bias = torch.zeros(B, M).masked_fill(torch.arange(M) > 65, float("-inf"))
        if branch.bias == "dead":
            bias[1] = float("-inf")
    res = semfid.subject_attention(q, k, v, k_ref, tokens=tokens, ref_tokens=ref_tokens,
                                   attn_bias=bias, head_reduce=branch.head_reduce,
                                   detach_reference=branch.detach, return_maps=branch.return_maps,
                                   backend="torch")
    out, loss = res[0], res[1]
    terms = {"both": [out.float().square().sum(), 100 * loss.sum()],
             "loss": [100 * loss.sum()], "maps": []}[branch.grads]
    if branch.return_maps:
        terms.append(10 * (res[2] * torch.linspace(0, 1, res[2].shape[-1])).sum())
    inputs = [q, k, v] + ([] if branch.detach else [k_ref])
    grads = torch.autograd.grad(sum(terms), inputs, allow_unused=True)
    return list(res) + list(grads)


@needs_core
@pytest.mark.parametrize("branch", BRANCHES, ids=lambda b: b.name)
def test_core_matches_python_bit_for_bit(branch: Branch, monkeypatch):
    core = _run(branch, True, monkeypatch)
    python = _run(branch, False, monkeypatch)
    assert len(core) == len(python)
    for i, (c, p) in enumerate(zip(core, python)):
        if p is None:
            assert c is None, f"{branch.name}: result {i} has a gradient only in C++"
            continue
        assert c.dtype == p.dtype and c.shape == p.shape and c.stride() == p.stride(), (
            f"{branch.name}: result {i}: C++ {c.dtype} {tuple(c.shape)} {c.stride()} vs Python "
            f"{p.dtype} {tuple(p.shape)} {p.stride()}")
        assert torch.equal(c, p) or (torch.isnan(c) == torch.isnan(p)).all() and torch.equal(
            c.nan_to_num(0.0), p.nan_to_num(0.0)), f"{branch.name}: result {i} differs"


@pytest.mark.parametrize("use_core", [True, False], ids=["core", "python"])
@pytest.mark.parametrize("head_reduce", ["mean", "none"])
def test_no_queries_match_the_reference(use_core: bool, head_reduce: str, monkeypatch):
    """N = 0: the loss is the mean over an empty set (NaN, as torch.mean and the float64
    reference give it) and no gradient reaches the keys (zeros, not an error)."""
    if use_core and CORE is None:
        pytest.skip(f"semfid._cpu_ops: {_cpu_core.status()}")
    monkeypatch.setattr(torch_backend, "USE_CPU_CORE", use_core)
    q = torch.randn(2, 3, 0, 8, requires_grad=True)
    k, v, k_ref = (torch.randn(2, 3, 5, 8, requires_grad=True) for _ in range(3))
    out, loss = semfid.subject_attention(q, k, v, k_ref, tokens=[1, 3], head_reduce=head_reduce,
                                         detach_reference=False, backend="torch")
    ins64 = [t.detach().double().requires_grad_(True) for t in (q, k, v, k_ref)]
    out64, loss64 = subject_ref(*ins64, tokens=[1, 3], head_reduce=head_reduce,
                                detach_reference=False)[:2]
    assert out.shape == out64.shape == (2, 3, 0, 8)
    assert torch.isnan(loss).all() and torch.isnan(loss64).all()
    grads = torch.autograd.grad(out.sum() + loss.sum(), [q, k, v, k_ref])  # dloss = 1 reaches the op
    for g, t in zip(grads, (q, k, v, k_ref)):
        assert g.shape == t.shape and not g.any()


@pytest.mark.parametrize("path", ["core", "python", "cross_attention"])
def test_double_backward_is_refused_not_silently_wrong(path: str, monkeypatch):
    """Backward takes lse / the head-mean diff as constants: a graph through it would carry wrong
    second derivatives, so create_graph=True raises, naming the op, on every path."""
    if path == "core" and CORE is None:
        pytest.skip(f"semfid._cpu_ops: {_cpu_core.status()}")
    monkeypatch.setattr(torch_backend, "USE_CPU_CORE", path == "core")
    q = torch.randn(2, 3, 9, 8, requires_grad=True)
    k, v, k_ref = (torch.randn(2, 3, 7, 8, requires_grad=True) for _ in range(3))
    if path == "cross_attention":
        _, maps = semfid.cross_attention(q, k, v, select=[1, 2], backend="torch")
        total, op = maps.sum(), "cross_attention"
    else:
        _, loss = semfid.subject_attention(q, k, v, k_ref, tokens=[1, 2], backend="torch")
        total, op = loss.sum(), "subject_attention"
    with pytest.raises(RuntimeError, match=f"semfid.{op}.*double backward"):
        torch.autograd.grad(total, q, create_graph=True)
    (g,) = torch.autograd.grad(total, q)  # a plain first gradient still works
    assert torch.isfinite(g).all()


@needs_core
def test_core_runs_as_one_native_autograd_node(monkeypatch):
    q, k, v, k_ref = (torch.randn(1, 2, n, 8, requires_grad=True) for n in (5, 7, 7, 7))
    out, loss = semfid.subject_attention(q, k, v, k_ref, tokens=[1, 2], backend="torch")
    assert "SubjectFunction" in out.grad_fn.name() and loss.grad_fn is out.grad_fn
    monkeypatch.setattr(torch_backend, "USE_CPU_CORE", False)
    out, _ = semfid.subject_attention(q, k, v, k_ref, tokens=[1, 2], backend="torch")
    assert out.grad_fn.name() == "_EagerSubjectBackward"


@needs_core
@pytest.mark.parametrize("mean_heads", [True, False])
@pytest.mark.parametrize("return_maps", [True, False])
@pytest.mark.parametrize("detach", [True, False])
def test_core_layouts_are_the_contracts(mean_heads: bool, return_maps: bool, detach: bool):
    """The C++ functions allocate themselves: their layouts must be the fakes' (base.py)."""
    q = torch.randn(2, 9, 3, 4).transpose(1, 2)
    k, v, k_ref = (torch.randn(2, 11, 3, 4).transpose(1, 2) for _ in range(3))
    inp = SubjectInputs.validate(q, k, v, k_ref, tokens=[1, 2], head_reduce="mean" if mean_heads else "none",
                                 detach_reference=detach, return_maps=return_maps)
    want = empty_subject_outputs(q, v, inp.tokens, mean_heads, detach, return_maps, saves_lse=False)
    got = torch_backend.TorchBackend.subject_forward(inp)
    for w, g in zip(want, got):
        assert (g.shape, g.stride(), g.dtype) == (w.shape, w.stride(), w.dtype)
    dout = torch.randn(q.shape)
    grads = torch_backend.TorchBackend.subject_backward(inp, *got[:3], got[5], dout, torch.ones(2), None)
    for t, g in zip((q, k, v), grads):
        assert (g.shape, g.stride(), g.dtype) == (t.shape, t.stride(), t.dtype)
    assert grads[3].numel() == 0 if detach else grads[3].stride() == k_ref.stride()


# The Python implementation against float64, as the reference suite checks the core.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case,detach", [(CASES[1], True), (CASES[3], False), (CASES[5], True),
                                         (CASES[8], False), (CASES[10], True)],
                         ids=lambda x: x.id if hasattr(x, "id") else f"detach{x}")
def test_python_subject_path_matches_reference(case, detach: bool, dtype: torch.dtype, monkeypatch):
    monkeypatch.setattr(torch_backend, "USE_CPU_CORE", False)
    test_subject_attention_matches_reference(case, detach, dtype, "torch")


def test_core_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(_cpu_core, "_tried", False)
    monkeypatch.setattr(_cpu_core, "_module", None)
    monkeypatch.setenv("SEMFID_CPU_CORE", "0")
    assert _cpu_core.module() is None and _cpu_core.status() == "disabled by SEMFID_CPU_CORE=0"


def test_optional_build_failure_is_a_warning_not_an_abort(capsys):
    class FailingBuild:
        def build_extension(self, ext):
            raise RuntimeError("Error compiling objects for extension")

    class Ext:
        def __init__(self, optional: bool):
            self.name, self.optional = "semfid._cpu_ops", optional

    build = optional_build_ext(FailingBuild)()
    assert build.build_extension(Ext(optional=True)) is None
    assert "semfid._cpu_ops was not built" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="Error compiling"):
        build.build_extension(Ext(optional=False))


@needs_core
def test_a_subclass_replacing_a_direction_runs_its_own_code():
    """The core is TorchBackend's two subject methods in C++: a subclass overriding either (the
    self-test's fault-injection backends do) must not be bypassed by it."""
    class Subclass(torch_backend.TorchBackend):
        @staticmethod
        def subject_backward(inp, *args):
            return torch_backend.TorchBackend.subject_backward(inp, *args)

    q, k, v, k_ref = (torch.randn(1, 2, n, 8) for n in (5, 7, 7, 7))
    inp = SubjectInputs.validate(q, k, v, k_ref, tokens=[1])
    assert Subclass.eager_subject(inp) is None
    assert torch_backend.TorchBackend.eager_subject(inp) is not None
