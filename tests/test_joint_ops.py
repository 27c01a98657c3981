"""Joint key sets (issue 21) against the float64 reference, on every backend that runs them.

Layouts: SD3's joint block (keys [image, text]), Flux's (keys [text, image]), PixArt-Σ-like
cross-attention (300 keys, head dim 72) and one layer with M >= 4608 keys. The maps and the loss
cover the image queries (``map_queries``), ``k_ref`` replaces the text keys (``ref_segment``) and
is shorter or longer than them; text padding is masked with -inf. Every output and gradient is
checked with flash-attention's rule at float32 (error ≤ 2x / 3x plain PyTorch's at float32, plus
a few ulps) and, where the backend takes float64, at float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch

import semfid
from semfid._inputs import SubjectInputs
from semfid.backends import gemm_attention, get_backend, torch as torch_backend
from semfid.testing import assert_close_rule, attention_ref, subject_ref, ulp_atol
from conftest import backends_under_test

# "torch-blocked": the torch backend's online softmax in PyTorch (what CUDA tensors run), forced
# on CPU tensors; "torch" on CPU runs float32 through semfid.backends.gemm_attention (at every
# head dim here) and other dtypes through PyTorch's fused CPU flash kernels; "torch-fused": those
# kernels for float32 too.
PATHS = backends_under_test() + ["torch-blocked", "torch-fused"]
GRAD_FACTOR = 3.0


@dataclass(frozen=True)
class Layout:
    name: str
    B: int
    H: int
    N: int
    M: int
    D: int
    Dv: int
    map_queries: Optional[Tuple[int, int]]
    ref_segment: Optional[Tuple[int, int]]
    M_ref: int
    tokens: Tuple[int, ...]
    ref_tokens: Tuple[int, ...]
    masked: Tuple[int, ...] = ()  # keys masked with -inf in batch row 0


# SD3: 19 image + 7 text tokens, keys [image, text]; k_ref (5 keys) shorter than the text.
SD3 = Layout("sd3", 2, 3, 26, 26, 16, 16, (0, 19), (19, 26), 5, (20, 23), (19, 22), masked=(25,))
# Flux: 6 text + 21 image tokens, keys [text, image]; k_ref (9 keys) longer than the text.
FLUX = Layout("flux", 1, 2, 27, 27, 24, 24, (6, 27), (0, 6), 9, (1, 4), (2, 8), masked=(5,))
# PixArt-Σ-like cross-attention: 300 text keys, head dim 72, maps over some queries.
PIXART = Layout("pixart", 1, 2, 23, 300, 72, 72, (3, 20), None, 300, (7, 120, 299), (7, 121, 298),
                masked=(290, 299))
# A long joint layer (M >= 4608): text 17 keys after 4600 image keys; odd value dim.
LONG = Layout("long", 1, 1, 9, 4617, 8, 5, (2, 9), (4600, 4617), 11, (4601, 4610), (4601, 4605))
# A segment in the middle of the keys; the maps cover no query at the start / end.
MIDDLE = Layout("middle", 2, 1, 13, 15, 8, 8, (1, 12), (5, 9), 2, (0, 6, 14), (0, 5, 12))
LAYOUTS = [SD3, FLUX, PIXART, LONG, MIDDLE]


def _inputs(lay: Layout, dtype: torch.dtype):
    B, H, N, M, D = lay.B, lay.H, lay.N, lay.M, lay.D
    q = torch.randn(B, H, N, D, dtype=dtype)
    k = torch.randn(B, H, M, D, dtype=dtype)
    v = torch.randn(B, H, M, lay.Dv, dtype=dtype)
    k_ref = torch.randn(B, H, lay.M_ref, D, dtype=dtype)
    bias = None
    if lay.masked:
        bias = torch.zeros(B, M, dtype=dtype)
        bias[0, list(lay.masked)] = float("-inf")
    return q, k, v, k_ref, bias


def _run_path(path: str, monkeypatch) -> str:
    if path == "torch-blocked":
        monkeypatch.setattr(torch_backend, "USE_FUSED_CPU", False)
        return "torch"
    if path == "torch-fused":
        monkeypatch.setattr(torch_backend, "USE_GEMM_CPU", False)
        return "torch"
    if path == "torch":  # the small test heads too: float32 through gemm_attention
        monkeypatch.setattr(gemm_attention, "MIN_HEAD_DIM", 0)
    return path


def _skip_unless_supported(backend: str, q, k, v, k_ref, lay: Layout, **kw) -> None:
    inp = SubjectInputs.validate(q, k, v, k_ref, tokens=list(lay.tokens),
                                 ref_tokens=list(lay.ref_tokens), map_queries=lay.map_queries,
                                 ref_segment=lay.ref_segment, **kw)
    reasons = get_backend(backend).not_supported_reasons(inp)
    if backend in ("torch", "sdpa"):
        assert not reasons, reasons  # the backends the issue requires for joint key sets
    elif reasons:
        pytest.skip(f"{backend}: " + "; ".join(reasons))


def _grads(outputs, inputs, cotangents):
    got = torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, got)]


# Each head reduction with the reference detached and not, each at one of the two dtypes.
@pytest.mark.parametrize("head_reduce,detach,dtype", [
    ("mean", True, torch.float32), ("none", False, torch.float32), ("mean", False, torch.float64),
    ("none", True, torch.float64)], ids=["mean-detached-fp32", "none-fp32", "mean-fp64",
                                         "none-detached-fp64"])
@pytest.mark.parametrize("lay", LAYOUTS, ids=lambda lay: lay.name)
@pytest.mark.parametrize("path", PATHS)
def test_subject_attention_joint_matches_reference(path, lay, head_reduce, detach, dtype, monkeypatch):
    backend = _run_path(path, monkeypatch)
    if lay is LONG and (head_reduce, detach) != ("mean", False):
        pytest.skip("the long layer runs once, with every gradient path (reference not detached)")
    q, k, v, k_ref, bias = _inputs(lay, dtype)
    if dtype not in get_backend(backend).SUPPORTED_DTYPES:
        pytest.skip(f"{backend} does not take {dtype}")
    _skip_unless_supported(backend, q, k, v, k_ref, lay, attn_bias=bias, head_reduce=head_reduce,
                           detach_reference=detach)
    kw = dict(tokens=list(lay.tokens), ref_tokens=list(lay.ref_tokens), attn_bias=bias,
              head_reduce=head_reduce, detach_reference=detach, return_maps=True,
              map_queries=lay.map_queries, ref_segment=lay.ref_segment)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, k_ref)]
    got = semfid.subject_attention(*leaves, backend=backend, **kw)
    cot = [torch.randn_like(got[0]), torch.rand_like(got[1]) + 0.5, torch.randn_like(got[2])]
    got_grads = _grads(got, leaves, cot)

    ref_leaves = [t.detach().to(torch.float64).requires_grad_() for t in leaves]
    ref = subject_ref(*ref_leaves, **kw)
    ref_grads = _grads(ref, ref_leaves, [c.to(torch.float64) for c in cot])
    plain_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    plain = subject_ref(*plain_leaves, upcast=False, **kw)
    plain_grads = _grads(plain, plain_leaves, [c.to(plain[0].dtype) for c in cot])

    # float64: plain PyTorch is the reference itself, so a few ulps of the values' size decide
    big = 8.0 if dtype == torch.float64 else 1.0
    for name, g, r, p in zip(("out", "loss", "maps"), got, ref, plain):
        assert_close_rule(f"{name} [{path}, {lay.name}]", g, r, p, atol=ulp_atol(dtype, big))
    for name, g, r, p in zip(("dq", "dk", "dv", "dk_ref"), got_grads, ref_grads, plain_grads):
        assert_close_rule(f"{name} [{path}, {lay.name}]", g, r, p, factor=GRAD_FACTOR,
                          atol=ulp_atol(dtype, 4.0 * big))
    if detach:
        assert not got_grads[3].any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("path", PATHS)
def test_subject_attention_joint_half_precision(path, dtype, monkeypatch):
    """fp16 / bf16 inputs (fp32 softmax statistics inside) on the Flux layout, every gradient."""
    test_subject_attention_joint_matches_reference(path, FLUX, "none", False, dtype, monkeypatch)


@pytest.mark.parametrize("head_reduce", ["mean", "none"])
@pytest.mark.parametrize("lay", [SD3, FLUX, PIXART, LONG], ids=lambda lay: lay.name)
@pytest.mark.parametrize("path", PATHS)
def test_cross_attention_and_maps_joint_match_reference(path, lay, head_reduce, monkeypatch):
    backend = _run_path(path, monkeypatch)
    dtype = torch.float32
    q, k, v, _, bias = _inputs(lay, dtype)
    select = list(lay.tokens)
    kw = dict(select=select, attn_bias=bias, head_reduce=head_reduce, map_queries=lay.map_queries)
    try:
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, maps = semfid.cross_attention(*leaves, backend=backend, **kw)
    except ValueError as exc:
        if backend in ("torch", "sdpa"):
            raise
        pytest.skip(str(exc).splitlines()[-1])
    only_maps = semfid.attention_maps(*leaves[:2], backend=backend, **kw)
    cot = [torch.randn_like(out), torch.randn_like(maps), torch.randn_like(only_maps)]
    got_grads = _grads([out, maps, only_maps], leaves, cot)

    def reference(upcast: bool):
        ls = [t.detach().to(torch.float64 if upcast else dtype).requires_grad_() for t in leaves]
        o, m = attention_ref(*ls, upcast=upcast, **kw)
        m2 = attention_ref(ls[0], ls[1], None, upcast=upcast, **kw)[1]
        res = [o, m, m2]
        return res, _grads(res, ls, [c.to(o.dtype) for c in cot])

    (ref, ref_grads), (plain, plain_grads) = reference(True), reference(False)
    for name, g, r, p in zip(("out", "maps", "attention_maps"), [out, maps, only_maps], ref, plain):
        assert_close_rule(f"{name} [{path}, {lay.name}]", g, r, p, atol=ulp_atol(dtype))
    for name, g, r, p in zip(("dq", "dk", "dv"), got_grads, ref_grads, plain_grads):
        assert_close_rule(f"{name} [{path}, {lay.name}]", g, r, p, factor=GRAD_FACTOR,
                          atol=ulp_atol(dtype, 4.0))


@pytest.mark.parametrize("path", ["torch", "torch-blocked", "sdpa"])
def test_empty_map_range_and_fully_masked_rows(path, monkeypatch):
    """No map query: NaN loss (a mean over nothing, as the reference) and finite gradients;
    a batch row whose keys are all -inf: zero out, zero maps."""
    backend = _run_path(path, monkeypatch)
    q, k, v, k_ref, _ = _inputs(MIDDLE, torch.float64)
    bias = torch.zeros(MIDDLE.B, MIDDLE.M, dtype=torch.float64)
    bias[1] = float("-inf")
    kw = dict(tokens=[0, 6], ref_tokens=[1, 3], attn_bias=bias, ref_segment=(5, 9))
    out, loss = semfid.subject_attention(q, k, v, k_ref, map_queries=(4, 4), backend=backend, **kw)
    assert torch.isnan(loss).all()
    out, loss, maps = semfid.subject_attention(q, k, v, k_ref, map_queries=(2, 7), return_maps=True,
                                               backend=backend, **kw)
    ref = subject_ref(q, k, v, k_ref, map_queries=(2, 7), return_maps=True, **kw)
    assert not out[1].any() and not maps[1].any()
    for g, r in zip((out, loss, maps), ref):
        torch.testing.assert_close(g, r)


def test_backward_row_term_matches_the_loop_and_declines_zero_rows():
    """The backward without the maps' value columns (joint._sparse_map_backward): the fused CPU
    kernel with the extra row term carried in ``out`` equals the PyTorch loop's exact version in
    float64 (odd sizes, one -inf key); a row with dout = 0 and a nonzero extra term is declined."""
    from semfid.backends.primitives import Blocked, FusedCpu

    B, H, N, M, D = 2, 3, 19, 23, 12
    q, k, v = (torch.randn(B, H, n, D, dtype=torch.float64) for n in (N, M, M))
    bias = torch.zeros(B, H, M, dtype=torch.float64)
    bias[0, :, 5] = float("-inf")
    out, lse = Blocked.attend(q, k, v, bias, 0.3)
    dout, extra = torch.randn_like(out), torch.randn(B, H, N, dtype=torch.float64)
    got = FusedCpu.attend_backward_delta(q, k, v, bias, 0.3, out, lse, dout, extra)
    want = Blocked.attend_backward_delta(q, k, v, bias, 0.3, out, lse, dout, extra)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-10, atol=1e-10)
    dout[1, 2, 4] = 0
    assert FusedCpu.attend_backward_delta(q, k, v, bias, 0.3, out, lse, dout, extra) is None
    extra[1, 2, 4] = 0
    assert FusedCpu.attend_backward_delta(q, k, v, bias, 0.3, out, lse, dout, extra) is not None


@pytest.mark.parametrize("path", ["torch", "torch-blocked", "sdpa"])
def test_zero_out_gradient_rows_match_reference(path, monkeypatch):
    """Map rows whose out gradient is exactly 0 (the fused CPU path then widens the values
    instead) and a dout-free call give the reference's gradients."""
    backend = _run_path(path, monkeypatch)
    q, k, v, k_ref, bias = _inputs(FLUX, torch.float64)
    kw = dict(tokens=list(FLUX.tokens), ref_tokens=list(FLUX.ref_tokens), attn_bias=bias,
              map_queries=FLUX.map_queries, ref_segment=FLUX.ref_segment, detach_reference=False)
    dout = torch.randn_like(q)
    dout[:, :, 9:12] = 0  # map queries
    for with_dout in (True, False):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, k_ref)]
        ref_leaves = [t.clone().requires_grad_() for t in (q, k, v, k_ref)]
        got = semfid.subject_attention(*leaves, backend=backend, **kw)
        ref = subject_ref(*ref_leaves, **kw)
        cots = ([dout] if with_dout else []) + [torch.ones(1, dtype=torch.float64)]
        g = _grads(list(got[2 - len(cots):]), leaves, cots)
        r = _grads(list(ref[2 - len(cots):]), ref_leaves, cots)
        for name, a, b in zip(("dq", "dk", "dv", "dk_ref"), g, r):
            torch.testing.assert_close(a, b, msg=lambda m: f"{name} [{path}]: {m}")


def _layer(B: int, N: int, H: int, D: int, dtype=torch.float32):
    """q, k, v as diffusers hands them over: [B, N, H, D] memory seen as [B, H, N, D]."""
    return [torch.randn(B, N, H, D, dtype=dtype).transpose(1, 2) for _ in range(3)]


@pytest.mark.parametrize("path", ["torch", "torch-fused", "sdpa"])
def test_opcheck_joint_ops(path, monkeypatch):
    path = _run_path(path, monkeypatch)
    q, k, v = _layer(1, 11, 2, 8)
    k_ref = torch.randn(1, 2, 3, 8)
    tokens = torch.tensor([[8, 9]])
    args = (q, k, v, k_ref, None, None, tokens, torch.tensor([[8, 10]]), None, 0.3, True, False,
            True, path, 0, 8, 8, 11)
    torch.library.opcheck(torch.ops.semfid.subject_fwd.default, args)
    out, lse, lse_ref, loss, maps, diff = torch.ops.semfid.subject_fwd(*args)
    assert maps.shape == (1, 8, 2)
    bwd = args[:12] + (out, lse, lse_ref, diff, torch.randn_like(out), torch.ones(1),
                       torch.randn_like(maps), path, 0, 8, 8, 11)
    torch.library.opcheck(torch.ops.semfid.subject_bwd.default, bwd)
    xargs = (q, k, v, None, tokens, 0.3, False, path, 2, 8)
    torch.library.opcheck(torch.ops.semfid.xattn_fwd.default, xargs)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["torch", "torch-fused", "sdpa"])
def test_compile_fullgraph_joint(path, monkeypatch):
    path = _run_path(path, monkeypatch)
    torch._dynamo.reset()
    q, k, v = _layer(1, 13, 2, 8)
    k_ref = torch.randn(1, 2, 4, 8)

    def step(q, k, v, k_ref):
        out, loss, maps = semfid.subject_attention(
            q, k, v, k_ref, tokens=[9, 11], map_queries=(0, 9), ref_segment=(9, 13),
            return_maps=True, backend=path)
        o2, m2 = semfid.cross_attention(q, k, v, select=[10], map_queries=(0, 9), backend=path)
        return out.sum() + loss.sum() + maps.sum() + o2.sum() + m2.sum()

    leaves = [t.detach().requires_grad_() for t in (q, k, v, k_ref)]
    compiled = torch.compile(step, backend="inductor", fullgraph=True)
    got = compiled(*leaves)
    got_grads = torch.autograd.grad(got, leaves[:3])
    eager_leaves = [t.detach().requires_grad_() for t in (q, k, v, k_ref)]
    want = step(*eager_leaves)
    want_grads = torch.autograd.grad(want, eager_leaves[:3])
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(map_queries=(5, 3)), ValueError, "map_queries"),
    (dict(map_queries=(0, 14)), ValueError, "map_queries"),
    (dict(map_queries=(0.0, 3)), TypeError, "map_queries"),
    (dict(map_queries="03"), TypeError, "map_queries"),
    (dict(map_queries=(True, 3)), TypeError, "map_queries"),
    (dict(ref_segment=(3, 16)), ValueError, "ref_segment"),
    (dict(ref_segment=(4,)), TypeError, "ref_segment"),
    (dict(ref_segment=(5, 9), ref_tokens=[0, 14]), IndexError, "ref_tokens"),
    (dict(ref_segment=(5, 9), tokens=[13, 14]), IndexError, "ref_tokens defaults to tokens"),
])
def test_bad_joint_arguments_name_the_argument(kwargs, error, words):
    q, k, v, k_ref, _ = _inputs(MIDDLE, torch.float32)  # N = 13, M = 15, M_ref = 2
    call = dict(tokens=[0, 6])
    call.update(kwargs)
    with pytest.raises(error, match=words):
        semfid.subject_attention(q, k, v, k_ref, **call)
    if "map_queries" in kwargs:
        with pytest.raises(error, match="map_queries"):
            semfid.cross_attention(q, k, v, select=[1], map_queries=kwargs["map_queries"])


def test_kernel_backends_decline_what_they_cannot_run():
    """cuda (keys staged on chip, <= 128) and any backend without JOINT_RANGES say why; auto
    falls back to one that runs the layer."""
    q, k, v, k_ref, _ = _inputs(FLUX, torch.float16)
    inp = SubjectInputs.validate(q, k, v, k_ref, tokens=[1], map_queries=(6, 27),
                                 ref_segment=(0, 6))
    cuda = get_backend("cuda")
    assert any("map_queries" in r for r in cuda.not_supported_reasons(inp))
    long_keys = SubjectInputs.validate(q, torch.randn(1, 2, 300, 24, dtype=torch.float16),
                                       torch.randn(1, 2, 300, 24, dtype=torch.float16), k_ref,
                                       tokens=[1])
    assert any("num_keys=300" in r for r in cuda.not_supported_reasons(long_keys))
    out, loss = semfid.subject_attention(q.float(), k.float(), v.float(), k_ref.float(), tokens=[1],
                                         map_queries=(6, 27), ref_segment=(0, 6))
    assert out.shape == (1, 2, 27, 24) and loss.shape == (1,)
