"""The ``sdpa`` backend (augmented values on PyTorch's fused SDPA) against the float64 reference.

Every op of both contracts (xattn: out, lse, maps and dq/dk/dv; subject: out, loss, maps and
dq/dk/dv/dk_ref) on fresh random inputs with odd sizes, -inf / -10000 padding and fully masked
rows, diffusers' transposed layout, ragged token rows, detach true/false, head mean / none, with
flash-attention's rule (2x plain PyTorch's error for outputs, 3x for gradients). Both ways of
getting lse are covered: PyTorch's lse-returning kernel and the public-API fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import pytest
import torch
import torch.nn.functional as F

import semfid
from semfid._inputs import SubjectInputs, XattnInputs
from semfid.backends import get_backend
from semfid.backends import sdpa
from semfid.testing import SavedBytes, assert_close_rule, attention_ref, subject_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRAD_FACTOR = 3.0


def _ids(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


@pytest.fixture(params=[True, False], ids=["lse_kernel", "public_sdpa"])
def lse_path(request, monkeypatch):
    """Run a test through PyTorch's lse-returning kernel and through the public-API fallback."""
    monkeypatch.setattr(sdpa, "USE_LSE_KERNELS", request.param)
    return request.param


def _tensor(B, H, n, d, dtype, transposed):
    """[B, H, n, d]; diffusers' layout when ``transposed``: a view of [B, n, H*d]."""
    if transposed:
        return torch.randn(B, n, H * d).view(B, n, H, d).transpose(1, 2).to(dtype)
    return torch.randn(B, H, n, d).to(dtype)


def _padding_bias(B: int, M: int, kind: str) -> Optional[torch.Tensor]:
    """[B, 1, M] additive bias: none, -inf / -10000 on random trailing keys, or ``dead``: -inf
    everywhere on batch row 0 (P = 0 there) and padding on the others."""
    if kind == "none":
        return None
    fill = -10000.0 if kind == "neg_10000" else float("-inf")
    bias = torch.zeros(B, 1, M)
    for b in range(B):
        bias[b, 0, int(torch.randint(1, M + 1, ())):] = fill
    if kind == "dead":
        bias[0] = float("-inf")
    return bias


def _canonical(bias: Optional[torch.Tensor], H: int) -> Optional[torch.Tensor]:
    return None if bias is None else bias.expand(-1, H, -1)


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _grads(outputs, upstream, inputs):
    total = sum((o.to(torch.float64) * g.to(torch.float64)).sum() for o, g in zip(outputs, upstream))
    return torch.autograd.grad(total, inputs, allow_unused=True)


def _xattn_backward(q, k, v, bias, select, scale, mean_heads, *saved_and_grads):
    """The backend's xattn backward (joint's augmented backward from the saved out and lse)."""
    inp = XattnInputs(q, k, v, bias, select, scale, mean_heads)
    return get_backend("sdpa").backward(inp, *saved_and_grads)


def _subject_backward(*args):
    """The backend's subject backward; args as ``sdpa.subject_forward``'s (less return_maps),
    then out, lse, lse_ref, diff, dout, dloss, dmaps."""
    return get_backend("sdpa").subject_backward(SubjectInputs(*args[:12], True), *args[12:])


def _atol(*refs) -> float:
    scale = max([float(r.detach().abs().max()) for r in refs if r is not None and r.numel()] + [1.0])
    return 16 * torch.finfo(torch.float32).eps * scale


# ------------------------------------------------------------------------------------------------
# xattn contract: cross_attention / attention_maps through the public API
# ------------------------------------------------------------------------------------------------
XATTN_CASES = [  # B, H, N, M, D, Dv, S, head_reduce, bias, transposed
    (1, 1, 1, 1, 8, 8, 1, "mean", "none", False),
    (2, 3, 17, 7, 40, 40, 3, "none", "dead", True),
    (2, 2, 130, 77, 40, 24, 7, "mean", "neg_10000", True),
    (3, 2, 33, 77, 80, 80, 5, "none", "neg_inf", False),
    (1, 2, 17, 77, 160, 160, 77, "mean", "dead", True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("maps_only", [False, True], ids=["out_maps", "maps_only"])
@pytest.mark.parametrize("case", XATTN_CASES, ids=lambda c: "B{}H{}N{}M{}D{}Dv{}S{}-{}-{}-{}".format(
    *c[:9], "diffusers" if c[9] else "contiguous"))
def test_xattn_matches_reference(case, maps_only, dtype, lse_path):
    B, H, N, M, D, Dv, S, head_reduce, bias_kind, transposed = case
    q, k, v = (_tensor(B, H, n, d, dtype, transposed) for n, d in ((N, D), (M, D), (M, Dv)))
    bias = _padding_bias(B, M, bias_kind)
    select = torch.randint(0, M, (B, S))
    kw = dict(attn_bias=bias, select=select, head_reduce=head_reduce)

    ins = [_leaf(t) for t in (q, k, v)]
    if maps_only:
        got = (semfid.attention_maps(ins[0], ins[1], backend="sdpa", **kw),)
    else:
        got = semfid.cross_attention(*ins, backend="sdpa", **kw)
    ins64 = [_leaf(t.to(torch.float64)) for t in (q, k, v)]
    insp = [_leaf(t) for t in (q, k, v)]
    ref = attention_ref(*ins64, **kw)
    plain = attention_ref(*insp, upcast=False, **kw)
    if maps_only:
        ref, plain = ref[1:], plain[1:]
    names = ("maps",) if maps_only else ("out", "maps")
    for name, g, r, p in zip(names, got, ref, plain):
        assert torch.isfinite(g).all(), name
        assert_close_rule(f"{name} ({dtype})", g, r, p, atol=_atol(r))
    upstream = [torch.randn(r.shape, dtype=torch.float64) for r in ref]
    n_in = 2 if maps_only else 3
    g_got = _grads(got, upstream, ins[:n_in])
    g_ref = _grads(ref, upstream, ins64[:n_in])
    g_plain = _grads(plain, upstream, insp[:n_in])
    atol = _atol(*g_ref)
    for name, g, r, p, x in zip(("dq", "dk", "dv"), g_got, g_ref, g_plain, ins):
        assert g.dtype == dtype and g.stride() == x.stride(), name  # empty_like(input) strides
        assert_close_rule(f"{name} ({dtype})", g, r, p, factor=GRAD_FACTOR, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_ids)
def test_xattn_lse_layout_and_dead_rows(dtype, lse_path):
    B, H, N, M, D = 2, 3, 9, 7, 16
    q, k, v = (torch.randn(B, H, n, D, dtype=dtype) for n in (N, M, M))
    bias = _canonical(_padding_bias(B, M, "dead"), H)
    out, lse, maps = sdpa.xattn_forward(q, k, v, bias, torch.tensor([[0, 3]] * B), 0.7, False)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    logits = (q.double() @ k.double().transpose(-1, -2)) * 0.7 + bias[:, :, None, :].double()
    assert lse.dtype == acc and lse.shape == (B, H, N)
    assert torch.all(torch.isposinf(lse[0]))  # all keys -inf: lse = +inf, P = 0
    torch.testing.assert_close(lse[1].double(), torch.logsumexp(logits[1], -1), rtol=1e-5, atol=1e-5)
    assert torch.all(out[0] == 0) and torch.all(maps[0] == 0)
    assert out.transpose(1, 2).is_contiguous()  # [B, N, H, Dv] memory: the processor's reshape is a view
    dq, dk, dv = _xattn_backward(q, k, v, bias, torch.tensor([[0, 3]] * B), 0.7, False, out, lse,
                                     torch.randn_like(out), torch.randn_like(maps))
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all() and torch.all(g[0] == 0)


# ------------------------------------------------------------------------------------------------
# subject contract: subject_fwd / subject_bwd math (CONTRACT.md)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SubjectCase:
    B: int
    H: int
    N: int
    M: int
    M_ref: int
    D: int
    Dv: int
    S: int
    head_reduce: str
    detach: bool
    bias: str
    ragged: bool
    transposed: bool

    @property
    def id(self) -> str:
        return (f"B{self.B}H{self.H}N{self.N}M{self.M}Mr{self.M_ref}D{self.D}Dv{self.Dv}S{self.S}-"
                f"{self.head_reduce}-{'detach' if self.detach else 'grad_ref'}-{self.bias}"
                f"{'-ragged' if self.ragged else ''}{'-diffusers' if self.transposed else ''}")


SUBJECT_CASES = [
    SubjectCase(1, 1, 1, 1, 1, 8, 8, 1, "mean", True, "none", False, False),
    SubjectCase(2, 2, 17, 7, 9, 40, 40, 3, "mean", False, "neg_inf", True, True),
    SubjectCase(2, 3, 130, 77, 77, 40, 40, 7, "none", True, "neg_10000", False, True),
    SubjectCase(3, 2, 17, 77, 77, 80, 64, 5, "none", False, "dead", True, False),
    SubjectCase(2, 2, 33, 77, 77, 64, 64, 77, "mean", True, "dead", False, True),
    SubjectCase(2, 1, 130, 7, 7, 160, 160, 2, "mean", False, "neg_10000", False, False),
]


def _token_rows(case: SubjectCase, M: int) -> List[List[int]]:
    lengths = [int(torch.randint(1, case.S + 1, ())) for _ in range(case.B)] if case.ragged else [case.S] * case.B
    lengths[0] = case.S
    return [torch.randint(0, M, (n,)).tolist() for n in lengths]


def _padded(rows: List[List[int]], S: int) -> torch.Tensor:
    return torch.tensor([r + [0] * (S - len(r)) for r in rows], dtype=torch.int64)


def _weights(rows: List[List[int]], S: int, ragged: bool) -> Optional[torch.Tensor]:
    if not ragged:
        return None
    return torch.tensor([[1.0 / len(r)] * len(r) + [0.0] * (S - len(r)) for r in rows])


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("case", SUBJECT_CASES, ids=lambda c: c.id)
def test_subject_contract_matches_reference(case: SubjectCase, dtype, lse_path):
    B, H, N = case.B, case.H, case.N
    q = _tensor(B, H, N, case.D, dtype, case.transposed)
    k = _tensor(B, H, case.M, case.D, dtype, case.transposed)
    v = _tensor(B, H, case.M, case.Dv, dtype, case.transposed)
    k_ref = _tensor(B, H, case.M_ref, case.D, dtype, case.transposed)
    bias, ref_bias = _padding_bias(B, case.M, case.bias), _padding_bias(B, case.M_ref, "neg_10000")
    rows, ref_rows = _token_rows(case, case.M), None
    ref_rows = [torch.randint(0, case.M_ref, (len(r),)).tolist() for r in rows]
    tokens, ref_tokens = _padded(rows, case.S), _padded(ref_rows, case.S)
    weights = _weights(rows, case.S, case.ragged)
    mean = case.head_reduce == "mean"
    scale = case.D ** -0.5

    out, lse, lse_ref, loss, maps, diff = sdpa.subject_forward(
        q, k, v, k_ref, _canonical(bias, H), _canonical(ref_bias, H), tokens, ref_tokens, weights,
        scale, mean, case.detach, True)
    kw = dict(tokens=rows, ref_tokens=ref_rows, attn_bias=bias, ref_attn_bias=ref_bias,
              head_reduce=case.head_reduce, detach_reference=case.detach, return_maps=True)
    ins64 = [_leaf(t.to(torch.float64)) for t in (q, k, v, k_ref)]
    insp = [_leaf(t) for t in (q, k, v, k_ref)]
    ref = subject_ref(*ins64, **kw)
    plain = subject_ref(*insp, upcast=False, **kw)
    acc = torch.float32
    assert loss.shape == (B,) and loss.dtype == acc and maps.dtype == acc and out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous()
    assert lse.shape == (B, H, N)
    assert lse_ref.numel() == (0 if case.detach and mean else B * H * N)
    assert diff.shape == ((B, N, case.S) if mean else (0,))
    if weights is not None:  # ragged padding columns: semfid.ops zeroes them in the maps
        maps = maps * (weights > 0)[:, None, :] if mean else maps * (weights > 0)[:, None, None, :]
    for name, g, r, p in zip(("out", "loss", "maps"), (out, loss, maps), ref, plain):
        assert torch.isfinite(g).all(), name
        assert_close_rule(f"{name} ({dtype})", g, r, p, atol=_atol(r))

    upstream = [torch.randn(ref[0].shape, dtype=torch.float64),
                torch.randn(B, dtype=torch.float64) * 1e3, torch.randn(ref[2].shape, dtype=torch.float64)]
    maps_grad = upstream[2].to(acc)
    if weights is not None:
        maps_grad = maps_grad * ((weights > 0)[:, None, :] if mean else (weights > 0)[:, None, None, :])
    dq, dk, dv, dk_ref = _subject_backward(
        q, k, v, k_ref, _canonical(bias, H), _canonical(ref_bias, H), tokens, ref_tokens, weights,
        scale, mean, case.detach, out, lse, lse_ref, diff, upstream[0].to(dtype),
        upstream[1].to(acc), maps_grad)
    g_ref = _grads(ref, upstream, ins64)
    g_plain = _grads(plain, upstream, insp)
    atol = _atol(*g_ref)
    for name, g, r, p, x in zip(("dq", "dk", "dv", "dk_ref"), (dq, dk, dv, dk_ref), g_ref, g_plain,
                                (q, k, v, k_ref)):
        if name == "dk_ref" and case.detach:
            assert g.numel() == 0 and r is None
            continue
        assert g.dtype == dtype and g.stride() == x.stride(), name
        assert_close_rule(f"{name} ({dtype})", g, r, p, factor=GRAD_FACTOR, atol=atol)


def test_subject_backward_with_partial_gradients():
    """dout only, dloss only and nothing at all give the reference's gradients (zeros for none)."""
    B, H, N, M, D = 2, 2, 11, 7, 8
    q, k, v, k_ref = (torch.randn(B, H, n, D, dtype=torch.float64) for n in (N, M, M, M))
    tokens = torch.tensor([[1, 4], [0, 6]])
    args = (q, k, v, k_ref, None, None, tokens, tokens, None, D ** -0.5, True, False)
    out, lse, lse_ref, loss, _, diff = sdpa.subject_forward(*args, False)
    dout, dloss = torch.randn_like(out), torch.randn(B, dtype=torch.float64)
    for d_o, d_l in ((dout, None), (None, dloss), (None, None)):
        got = _subject_backward(*args, out, lse, lse_ref, diff, d_o, d_l, None)
        ins = [_leaf(t) for t in (q, k, v, k_ref)]
        r_out, r_loss = subject_ref(*ins, tokens=tokens, detach_reference=False)
        terms = [(o, g) for o, g in ((r_out, d_o), (r_loss, d_l)) if g is not None]
        want = (_grads(*zip(*terms), ins) if terms else [None] * 4)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, torch.zeros_like(g) if w is None else w)


# ------------------------------------------------------------------------------------------------
# backward from the saved out and lse: no forward recompute; the CUDA gate
# ------------------------------------------------------------------------------------------------
def _every_gradient(layout: str):
    """Forward of one op with every gradient path (dout, loss through a non-detached reference,
    per-head maps) on the UNet path (77 keys) or a Flux-like joint layout; returns (outputs, leaves)."""
    B, H, N, M, D = 1, 2, 19, 77, 24
    q, k, v = (torch.randn(B, H, n, D, requires_grad=True) for n in (N, M, M))
    k_ref = torch.randn(B, H, 5, D, requires_grad=True)
    joint = dict(map_queries=(3, N), ref_segment=(0, 4)) if layout == "joint" else {}
    subject = semfid.subject_attention(q, k, v, k_ref, tokens=[1, 2], detach_reference=False,
                                       head_reduce="none", return_maps=True, backend="sdpa", **joint)
    xattn = semfid.cross_attention(q, k, v, select=[0, 3], backend="sdpa",
                                   map_queries=joint.get("map_queries"))
    maps_only = semfid.attention_maps(q, k, select=[2], backend="sdpa",
                                      map_queries=joint.get("map_queries"))
    return [*subject, *xattn, maps_only], [q, k, v, k_ref]


@pytest.mark.parametrize("layout", ["unet", "joint"])
def test_backward_does_not_recompute_the_forward(layout, monkeypatch):
    """Backward feeds PyTorch's fused CPU backward the saved out and lse: no forward kernel runs
    in backward (counted at the one function every sdpa forward goes through). Forcing the
    recompute fallback is seen by the same count, so the check can fail."""
    from semfid.backends import sdpa_backward

    calls = {"forward": 0, "saved": 0}
    forward, saved = sdpa._fused_with_lse, sdpa_backward.cpu_backward

    def counted(name, fn):
        def run(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(sdpa, "_fused_with_lse", counted("forward", forward))
    monkeypatch.setattr(sdpa_backward, "cpu_backward", counted("saved", saved))
    for recompute in (False, True):
        if recompute:
            monkeypatch.setattr(sdpa_backward, "uses_saved_lse", lambda device, dtype: False)
        outputs, leaves = _every_gradient(layout)
        assert calls["forward"] > 0
        calls.update(forward=0, saved=0)
        torch.autograd.backward(outputs, [torch.randn_like(o) for o in outputs])
        assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in leaves)
        if recompute:
            assert calls["forward"] > 0 and calls["saved"] == 0
        else:
            assert calls["forward"] == 0 and calls["saved"] >= 3, calls


def test_saved_lse_backward_gate_on_cuda(monkeypatch):
    """The CUDA saved-lse backward runs only where its one-time self-check passed (verdict cached
    per device and dtype, injected here: no GPU needed); elsewhere the forward is recomputed,
    with the reason recorded and one warning."""
    from semfid.backends import sdpa_backward as sb

    checks = []
    verdicts = {torch.float16: None, torch.bfloat16: "dq differs from the recompute's by 0.5"}

    def fake_check(device, dtype, backward=sb.cuda_backward):
        checks.append((str(device), dtype))
        return verdicts[dtype]

    monkeypatch.setattr(sb, "self_check", fake_check)
    monkeypatch.setattr(sb, "VERDICTS", {})
    gpu0, gpu1 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert sb.backward_kernel(gpu0, torch.float16) is sb.cuda_backward
    assert sb.backward_kernel(gpu0, torch.float16) is sb.cuda_backward  # cached: checked once
    with pytest.warns(UserWarning, match="self-check on cuda:0 torch.bfloat16.*0.5"):
        assert sb.backward_kernel(gpu0, torch.bfloat16) is sb.recompute_backward
    assert sb.backward_kernel(gpu0, torch.bfloat16) is sb.recompute_backward
    assert sb.VERDICTS == {("cuda:0", torch.float16): None, ("cuda:0", torch.bfloat16): verdicts[torch.bfloat16]}
    assert sb.backward_kernel(gpu1, torch.float16) is sb.cuda_backward  # its own check
    # no saved-lse kernel for float64 on CUDA; CPU needs no check
    assert sb.backward_kernel(gpu0, torch.float64) is sb.recompute_backward
    assert sb.backward_kernel(torch.device("cpu"), torch.bfloat16) is sb.cpu_backward
    assert checks == [("cuda:0", torch.float16), ("cuda:0", torch.bfloat16), ("cuda:1", torch.float16)]


def test_self_check_passes_a_right_backward_and_refuses_wrong_ones():
    """The self-check itself, run on CPU: PyTorch's CPU saved-lse backward passes; a backward 1%
    off, one that ignores the -inf key, and a kernel that refuses the device each give a reason."""
    from semfid.backends import sdpa_backward as sb

    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert sb.self_check(cpu, dtype, sb.cpu_backward) is None, dtype

    def off_by_one_percent(*args):
        return [g * 1.01 for g in sb.cpu_backward(*args)]

    def ignores_bias(q, k, vv, bias, *rest):
        return sb.cpu_backward(q, k, vv, None, *rest)

    assert "differs" in sb.self_check(cpu, torch.float32, off_by_one_percent)
    assert "differs" in sb.self_check(cpu, torch.float16, ignores_bias)
    assert "NotImplementedError" in sb.self_check(cpu, torch.float16, sb.cuda_backward)


def test_cuda_backward_call_matches_the_op_schema():
    """The CUDA saved-lse call (argument order, padded lse, philox placeholders, bias layout) is
    accepted by PyTorch's meta kernel of the op and gives gradients of the inputs' shapes."""
    from semfid.backends import sdpa_backward as sb

    B, H, N, M, D, W = 2, 3, 37, 45, 20, 27
    meta = dict(device="meta", dtype=torch.float16)
    q, k, vv = torch.empty(B, H, N, D, **meta), torch.empty(B, H, M, D, **meta), torch.empty(B, H, M, W, **meta)
    out, dout = torch.empty(B, H, N, W, **meta), torch.empty(B, H, N, W, **meta)
    lse = torch.empty(B, H, N, device="meta")
    for bias in (None, torch.zeros(B, H, M, device="meta")):
        dq, dk, dvv = sb.cuda_backward(q, k, vv, bias, D ** -0.5, out, lse, dout)
        assert (dq.shape, dk.shape, dvv.shape) == (q.shape, k.shape, vv.shape)


def test_cuda_backward_hands_out_in_the_kernels_memory_layout():
    """PyTorch's memory-efficient backward reads ``out`` at a row stride of H * width whatever its
    strides (an H200 gave garbage gradients for [B, H, N, W]-contiguous out): out goes in [B, N, H, W]
    memory, padded with zero columns, whatever the layout it comes in."""
    from semfid.backends import sdpa_backward as sb

    B, H, N, W = 2, 3, 5, 7
    for out in (torch.randn(B, H, N, W), torch.randn(B, N, H, W).transpose(1, 2)):
        got = sb._bnhw(out, 8)
        assert got.shape == (B, H, N, 8) and got.transpose(1, 2).is_contiguous()
        assert torch.equal(got[..., :W], out) and not got[..., W:].any()
    already = torch.randn(B, N, H, W).transpose(1, 2)  # the forward's own out: handed over as it is
    assert sb._bnhw(already, W).data_ptr() == already.data_ptr()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_saved_lse_backward_on_cuda(dtype):
    """On a GPU (never run by us): the memory-efficient saved-lse backward passes its self-check
    and is the one used; the sdpa subject op on a UNet-sized and a Flux-like joint layer (every
    gradient, reference not detached, per-head maps) meets flash-attention's rule against float64."""
    from semfid.backends import sdpa_backward as sb

    dev = torch.device("cuda", torch.cuda.current_device())
    assert sb.self_check(dev, dtype) is None
    assert sb.backward_kernel(dev, dtype) is sb.cuda_backward
    B, H, N, D = 1, 3, 45, 40
    for M, joint in ((77, {}), (51, dict(map_queries=(7, N), ref_segment=(0, 7)))):
        q, k, v = (torch.randn(B, n, H, D).transpose(1, 2) for n in (N, M, M))
        k_ref = torch.randn(B, H, 9, D)
        kw = dict(tokens=[1, 3], ref_tokens=[2, 4], detach_reference=False, head_reduce="none",
                  return_maps=True, **joint)
        leaves = [_leaf(t.to(dev, dtype)) for t in (q, k, v, k_ref)]
        got = semfid.subject_attention(*leaves, backend="sdpa", **kw)
        ins64 = [_leaf(t.double()) for t in (q, k, v, k_ref)]
        insp = [_leaf(t.to(dev, dtype)) for t in (q, k, v, k_ref)]
        ref, plain = subject_ref(*ins64, **kw), subject_ref(*insp, upcast=False, **kw)
        upstream = [torch.randn(r.shape, dtype=torch.float64) for r in ref]
        cpu = [g.detach().cpu() for g in got]
        for name, g, r, p in zip(("out", "loss", "maps"), cpu, ref, plain):
            assert_close_rule(f"{name} ({dtype}, {M} keys)", g, r, p.detach().cpu(), atol=_atol(r))
        g_got = [g.cpu() for g in _grads(got, [u.to(dev) for u in upstream], leaves)]
        g_ref = _grads(ref, upstream, ins64)
        g_plain = [g.cpu() for g in _grads(plain, [u.to(dev) for u in upstream], insp)]
        for name, g, r, p in zip(("dq", "dk", "dv", "dk_ref"), g_got, g_ref, g_plain):
            assert_close_rule(f"{name} ({dtype}, {M} keys)", g, r, p, factor=GRAD_FACTOR,
                              atol=_atol(*g_ref))


# ------------------------------------------------------------------------------------------------
# memory and registration
# ------------------------------------------------------------------------------------------------
def test_recomputed_forward_does_not_keep_probabilities():
    """The fallback backward's recompute (CUDA where the saved-lse kernel failed its self-check)
    goes through a fused kernel: autograd keeps far less than P."""
    B, H, N, M, D, S = 2, 8, 1024, 77, 40, 10
    q, k = (torch.randn(B, H, n, D, requires_grad=True) for n in (N, M))
    v = torch.randn(B, H, M, D, requires_grad=True)
    select = torch.arange(S).expand(B, S)
    with SavedBytes() as saved:
        o, _ = sdpa.attend(q, k, sdpa.augmented_values(v, select, k), None, D ** -0.5)
    assert o.requires_grad
    W = D + S  # q and k padded to the augmented value width; out' as wide
    fused = 4 * B * H * (2 * N * W + 2 * M * W + N)  # q', out', k', v' and lse
    probabilities = 4 * B * H * N * M
    assert saved.nbytes < fused + probabilities / 2, f"{saved.mib:.2f} MiB saved: P was kept"


def test_saved_bytes_close_to_sdpa():
    """subject_attention on the sdpa backend keeps at most 1.15x what SDPA alone keeps."""
    B, H, N, M, D = 2, 8, 4096, 77, 40  # SD1.5 64x64 layer
    q, k, v, k_ref = (torch.randn(B, H, n, D, requires_grad=True) for n in (N, M, M, M))
    with SavedBytes() as alone:
        F.scaled_dot_product_attention(q, k, v)
    with SavedBytes() as ours:
        semfid.subject_attention(q, k, v, k_ref, tokens=list(range(1, 11)), backend="sdpa")
    assert ours.nbytes <= 1.15 * alone.nbytes, (ours.mib, alone.mib)


def test_backend_declaration():
    cls = get_backend("sdpa")
    assert cls.NAME == "sdpa" and 10 < cls.PRIORITY < get_backend("torch").PRIORITY
    assert cls.AUTO_DEVICES == frozenset({"cuda"}) and cls.unavailable_reason() is None
    assert {"cpu", "cuda"} <= cls.SUPPORTED_DEVICES
