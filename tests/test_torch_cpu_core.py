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
from semfid.testing import assert_close_rule, subject_ref

from csrc import cpu_build
from csrc.cpu_build import optional_build_ext
from test_ops_reference import CASES, GRAD_FACTOR, _tolerance, test_subject_attention_matches_reference

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


def _inputs(branch: Branch) -> tuple:
    """(q, k, v, k_ref) leaves in diffusers' layout, and subject_attention's keyword arguments."""
    gen = torch.Generator().manual_seed(7)
    B, H, N, M, D = 2, 3, branch.N, 77, 8 if branch.chunk != 5 else 4

    def views(L: int) -> torch.Tensor:  # [B, H, L, D] over [B, L, H·D] memory
        x = torch.randn(B, L, H * D, generator=gen).to(branch.dtype)
        return x.view(B, L, H, D).transpose(1, 2).detach().requires_grad_(True)

    q, k, v, k_ref = views(N), views(M), views(M), views(branch.M_ref)
    bias = None
    if branch.bias != "none":
        bias = torch.zeros(B, M).masked_fill(torch.arange(M) > 65, float("-inf"))
        if branch.bias == "dead":
            bias[1] = float("-inf")
    kw = dict(tokens=[[1, 2, 3], [4, 60]] if branch.ragged else [1, 2, 60],
              ref_tokens=[[0, 5, 6], [3, 9]] if branch.ragged else [0, 5, 9],
              attn_bias=bias, head_reduce=branch.head_reduce, detach_reference=branch.detach,
              return_maps=branch.return_maps)
    return (q, k, v, k_ref), kw


def _outputs_and_grads(branch: Branch, res, inputs) -> list:
    """res (out, loss[, maps]) and the gradients of one scalar built from what ``branch.grads`` names."""
    out, loss = res[0], res[1]
    terms = {"both": [out.double().square().sum(), 100 * loss.sum()],
             "loss": [100 * loss.sum()], "maps": []}[branch.grads]
    if branch.return_maps:
        terms.append(10 * (res[2] * torch.linspace(0, 1, res[2].shape[-1], dtype=res[2].dtype)).sum())
    wrt = list(inputs[:3]) + ([] if branch.detach else [inputs[3]])
    grads = torch.autograd.grad(sum(terms), wrt, allow_unused=True)
    return list(res) + list(grads)


def _run(branch: Branch, use_core: bool, monkeypatch, small_loops: bool = False) -> list:
    """Outputs and gradients of one subject_attention call on diffusers-layout inputs; in the
    core, through its ATen chunk loop or (small_loops) through csrc/cpu/subject_small.cpp."""
    monkeypatch.setattr(torch_backend, "USE_CPU_CORE", use_core)
    monkeypatch.setattr(torch_backend, "_SMALL_WORK", 1 << 40 if small_loops else 0)
    if branch.chunk is not None:
        monkeypatch.setattr(torch_backend, "_BLOCK_ELEMENTS", 1)
        monkeypatch.setattr(torch_backend, "_MIN_CHUNK", branch.chunk)
    inputs, kw = _inputs(branch)
    res = semfid.subject_attention(*inputs, backend="torch", **kw)
    return _outputs_and_grads(branch, res, inputs)


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


SMALL_BRANCHES = [b for b in BRANCHES if b.N > 0]  # N = 0 stays in the chunk loop


@needs_core
@pytest.mark.parametrize("branch", SMALL_BRANCHES, ids=lambda b: b.name)
def test_small_layer_loops_match_the_reference(branch: Branch, monkeypatch):
    """csrc/cpu/subject_small.cpp on every branch: float64 reference, flash-attention's rule
    (2x plain PyTorch's error for outputs, 3x for gradients), and the chunk loop's layouts."""
    inputs, kw = _inputs(branch)
    q, k, v, k_ref = inputs
    assert CORE.takes_small_loops(q, k, v, k_ref, torch.zeros(2, 3, dtype=torch.long), 1 << 40)
    got = _run(branch, True, monkeypatch, small_loops=True)
    chunked = _run(branch, True, monkeypatch, small_loops=False)
    ins64 = [t.detach().double().requires_grad_(True) for t in inputs]
    ref = _outputs_and_grads(branch, subject_ref(*ins64, **kw), ins64)
    insp = [t.detach().clone().requires_grad_(True) for t in inputs]
    plain = _outputs_and_grads(branch, subject_ref(*insp, upcast=False, **kw), insp)
    n_out = 3 if branch.return_maps else 2
    names = ["out", "loss", "maps"][:n_out] + ["dq", "dk", "dv", "dk_ref"]
    grad_atol = _tolerance(branch.dtype, *(r for r in ref[n_out:] if r is not None))
    for i, (name, g, r, p, c) in enumerate(zip(names, got, ref, plain, chunked)):
        if r is None:  # no path to this input (maps only: v); the op returns zeros there
            assert g is None or not g.any(), f"{branch.name}: {name} has a gradient only in the small loops"
            continue
        assert (g.dtype, g.shape, g.stride()) == (c.dtype, c.shape, c.stride()), (
            f"{branch.name}: {name}: small loops {g.dtype} {g.stride()} vs chunk loop {c.dtype} {c.stride()}")
        is_grad = i >= n_out
        assert_close_rule(f"{branch.name}: {name}", g, r, p, factor=GRAD_FACTOR if is_grad else 2.0,
                          atol=grad_atol if is_grad else _tolerance(branch.dtype, r))


@needs_core
def test_small_layer_loops_reject_out_of_range_tokens():
    """The C++ entry points check the token indices themselves (no out-of-bounds read)."""
    q, k, v, k_ref = (torch.randn(1, 2, n, 8) for n in (5, 7, 7, 7))
    bad = torch.tensor([[1, 7]])
    args = (q, k, v, k_ref, None, None, bad, torch.tensor([[0, 1]]), None, 0.3, True, False)
    with pytest.raises(IndexError, match=r"tokens\[0, 1\] = 7 is outside \[0, 7\)"):
        CORE.subject_forward(*args, *torch_backend._core_tuning()[:3], 1 << 40)


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
@pytest.mark.parametrize("small_work", [0, 1 << 40], ids=["chunk_loop", "small_loops"])
def test_core_layouts_are_the_contracts(mean_heads: bool, return_maps: bool, detach: bool,
                                        small_work: int, monkeypatch):
    """The C++ functions allocate themselves: their layouts must be the fakes' (base.py)."""
    monkeypatch.setattr(torch_backend, "_SMALL_WORK", small_work)
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


@pytest.mark.parametrize("works", [True, False])
def test_openmp_flag_only_where_the_compiler_takes_it(works: bool, monkeypatch):
    """at::parallel_for splits the small-layer loops over threads only when built with -fopenmp;
    a compiler without it still builds the core (one thread)."""
    monkeypatch.setattr(cpu_build, "openmp_works", lambda: works)
    monkeypatch.setenv("SEMFID_BUILD_CPU", "1")
    (ext,) = cpu_build.cpu_build()
    assert ("-fopenmp" in ext.extra_compile_args["cxx"]) is works
    assert ("-fopenmp" in ext.extra_link_args) is works


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
