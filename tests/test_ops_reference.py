"""semfid.cross_attention / subject_attention against the float64 reference, on every backend.

Each case draws fresh random inputs (odd sizes, padding biases, shared and per-batch selections)
and checks outputs, maps, loss and every gradient with flash-attention's rule: the backend's error
against float64 is at most 2x (outputs, maps, loss) or 3x (gradients) the error of plain PyTorch at
the same dtype (plus a few ulps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import semfid
from semfid.testing import assert_close_rule, attention_ref, subject_ref
from conftest import backends_under_test, device_under_test

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# flash-attention's rule (tests/test_flash_attn.py): outputs within 2x plain PyTorch's error at the
# same dtype, dq/dk/dv within 3x (a fused backward rounds P and dS to the input dtype for its
# matmuls, as flash-attention does; seen here: Triton dk at 2.02x in fp16 and 2.01x in bf16).
GRAD_FACTOR = 3.0
DEVICE = device_under_test()


@dataclass(frozen=True)
class Case:
    B: int
    H: int
    N: int
    M: int
    D: int
    Dv: int
    S: int
    per_batch_select: bool
    head_reduce: str
    bias: str  # none | neg_inf | neg_10000 | per_head | b11m
    scale: Optional[float]

    @property
    def id(self) -> str:
        sel = "selB" if self.per_batch_select else "sel"
        sc = "" if self.scale is None else f"-scale{self.scale:g}"
        return (f"B{self.B}H{self.H}N{self.N}M{self.M}D{self.D}Dv{self.Dv}-{sel}{self.S}-"
                f"{self.head_reduce}-{self.bias}{sc}")


# Every value of the grid appears: B {1,2,3}, H {1,2,5,8}, N {1,17,64,130,256},
# M {1,7,77}, D {8,40,64,80,160}.
CASES = [
    Case(1, 1, 1, 1, 8, 8, 1, False, "mean", "none", None),
    Case(2, 2, 17, 7, 40, 40, 3, True, "none", "neg_inf", None),
    Case(3, 5, 64, 77, 64, 64, 10, False, "mean", "neg_10000", 0.3),
    Case(2, 8, 130, 77, 80, 80, 5, True, "mean", "per_head", None),
    Case(1, 8, 256, 77, 160, 160, 4, False, "none", "b11m", None),
    Case(3, 1, 17, 77, 40, 24, 7, True, "mean", "neg_inf", 0.05),
    Case(2, 5, 1, 7, 160, 160, 2, False, "none", "neg_10000", None),
    Case(1, 2, 130, 1, 64, 64, 1, True, "mean", "none", None),
    Case(2, 8, 64, 7, 8, 8, 6, False, "none", "per_head", 1.0),
    Case(3, 2, 256, 7, 80, 80, 3, True, "none", "none", None),
    Case(1, 5, 17, 77, 8, 8, 12, True, "mean", "b11m", None),
]


def _bias(case: Case, dtype: torch.dtype) -> Optional[torch.Tensor]:
    B, H, M = case.B, case.H, case.M
    if case.bias == "none":
        return None
    if case.bias == "per_head":
        return torch.randn(B, H, 1, M, device=DEVICE, dtype=dtype)
    keep = torch.ones(B, M, dtype=torch.bool, device=DEVICE)
    for b in range(B):  # pad a random number of trailing keys; keep at least one
        n_keep = int(torch.randint(1, M + 1, ()))
        keep[b, n_keep:] = False
    fill = float("-inf") if case.bias == "neg_inf" else -10000.0
    bias = torch.zeros(B, M, device=DEVICE, dtype=dtype).masked_fill(~keep, fill)
    return bias[:, None, :] if case.bias in ("neg_inf", "neg_10000") else bias[:, None, None, :]


def _select(case: Case) -> torch.Tensor:
    shape = (case.B, case.S) if case.per_batch_select else (case.S,)
    return torch.randint(0, case.M, shape, device=DEVICE)  # duplicates allowed


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _grads(outputs, upstream, inputs):
    total = sum((o.to(torch.float64) * g.to(torch.float64)).sum() for o, g in zip(outputs, upstream))
    return torch.autograd.grad(total, inputs, allow_unused=True)


def _tolerance(dtype: torch.dtype, *refs: Optional[torch.Tensor]) -> float:
    """Absolute slack for cases where plain PyTorch is exact (e.g. M = 1: P = 1, dq = dk = 0
    exactly), while a fused backward's two formulations of rowsum(P ⊙ dP) differ by float32
    rounding. Scaled by the largest magnitude among ``refs`` (all gradients of one call)."""
    scale = max([float(r.detach().abs().max()) for r in refs if r is not None and r.numel()] + [1.0])
    return 16 * torch.finfo(torch.float32).eps * scale


@pytest.mark.parametrize("backend", backends_under_test())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("with_select", [True, False], ids=["maps", "out_only"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cross_attention_matches_reference(case: Case, with_select: bool, dtype: torch.dtype,
                                           backend: str):
    q = torch.randn(case.B, case.H, case.N, case.D, device=DEVICE).to(dtype)
    k = torch.randn(case.B, case.H, case.M, case.D, device=DEVICE).to(dtype)
    v = torch.randn(case.B, case.H, case.M, case.Dv, device=DEVICE).to(dtype)
    bias, select = _bias(case, torch.float32), _select(case) if with_select else None
    kw = dict(scale=case.scale, attn_bias=bias, select=select, head_reduce=case.head_reduce)

    qg, kg, vg = (_leaf(t) for t in (q, k, v))
    got = semfid.cross_attention(qg, kg, vg, backend=backend, **kw)
    q64, k64, v64 = (_leaf(t.to(torch.float64)) for t in (q, k, v))
    ref = attention_ref(q64, k64, v64, **kw)
    qp, kp, vp = (_leaf(t) for t in (q, k, v))
    plain = attention_ref(qp, kp, vp, upcast=False, **kw)

    if select is None:  # a single tensor: treat it as a one-element tuple like (out, maps)
        got, ref, plain = (got,), (ref,), (plain,)
    upstream = [torch.randn(r.shape, dtype=torch.float64, device=DEVICE) for r in ref]
    for name, g, r, p in zip(("out", "maps"), got, ref, plain):
        assert g.dtype == (dtype if name == "out" else torch.float32)
        assert_close_rule(f"{name} ({backend}, {dtype})", g, r, p, atol=_tolerance(dtype, r))
    grads_got = _grads(got, upstream, (qg, kg, vg))
    grads_ref = _grads(ref, upstream, (q64, k64, v64))
    grads_plain = _grads(plain, upstream, (qp, kp, vp))
    atol = _tolerance(dtype, *grads_ref)
    for name, g, r, p in zip(("dq", "dk", "dv"), grads_got, grads_ref, grads_plain):
        assert g.dtype == dtype
        assert_close_rule(f"{name} ({backend}, {dtype})", g, r, p, factor=GRAD_FACTOR, atol=atol)


SUBJECT_CASES = [
    (CASES[1], True), (CASES[2], False), (CASES[3], True), (CASES[5], False), (CASES[8], False),
    (CASES[10], True),
]


@pytest.mark.parametrize("backend", backends_under_test())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case,detach", SUBJECT_CASES,
                         ids=lambda x: x.id if isinstance(x, Case) else f"detach{x}")
def test_subject_attention_matches_reference(case: Case, detach: bool, dtype: torch.dtype,
                                             backend: str):
    M_ref = case.M + 2
    q = torch.randn(case.B, case.H, case.N, case.D, device=DEVICE).to(dtype)
    k = torch.randn(case.B, case.H, case.M, case.D, device=DEVICE).to(dtype)
    v = torch.randn(case.B, case.H, case.M, case.Dv, device=DEVICE).to(dtype)
    k_ref = torch.randn(case.B, case.H, M_ref, case.D, device=DEVICE).to(dtype)
    tokens = _select(case)
    ref_tokens = torch.randint(0, M_ref, tokens.shape, device=DEVICE)
    ref_bias = torch.zeros(case.B, 1, M_ref, device=DEVICE)
    ref_bias[:, :, -1] = -10000.0
    kw = dict(tokens=tokens, ref_tokens=ref_tokens, scale=case.scale,
              attn_bias=_bias(case, torch.float32), ref_attn_bias=ref_bias,
              head_reduce=case.head_reduce, detach_reference=detach)

    ins = [_leaf(t) for t in (q, k, v, k_ref)]
    got = semfid.subject_attention(*ins, backend=backend, **kw)
    ins64 = [_leaf(t.to(torch.float64)) for t in (q, k, v, k_ref)]
    ref = subject_ref(*ins64, **kw)
    insp = [_leaf(t) for t in (q, k, v, k_ref)]
    plain = subject_ref(*insp, upcast=False, **kw)

    assert got[1].shape == (case.B,) and got[1].dtype == torch.float32
    for name, g, r, p in zip(("out", "loss"), got, ref, plain):
        assert_close_rule(f"{name} ({backend}, {dtype})", g, r, p, atol=_tolerance(dtype, r))
    # Scale the loss up so its gradient is comparable to the output's.
    upstream = [torch.randn(ref[0].shape, dtype=torch.float64, device=DEVICE),
                torch.full((case.B,), 1e3, dtype=torch.float64, device=DEVICE)]
    names = ("dq", "dk", "dv", "dk_ref")
    grads_got = _grads(got, upstream, ins)
    grads_ref = _grads(ref, upstream, ins64)
    grads_plain = _grads(plain, upstream, insp)
    atol = _tolerance(dtype, *grads_ref)
    for name, g, r, p in zip(names, grads_got, grads_ref, grads_plain):
        if name == "dk_ref" and detach:
            assert g is None and r is None
            continue
        assert_close_rule(f"{name} ({backend}, {dtype}, detach={detach})", g, r, p,
                          factor=GRAD_FACTOR, atol=atol)


@pytest.mark.parametrize("backend", backends_under_test())
def test_maps_only_pass_matches_reference(backend: str):
    q = torch.randn(2, 3, 33, 40, device=DEVICE, dtype=torch.float64)
    k = torch.randn(2, 3, 77, 40, device=DEVICE, dtype=torch.float64)
    select = [0, 5, 5, 76]
    if torch.float64 not in semfid.backends.get_backend(backend).SUPPORTED_DTYPES:
        q, k = q.float(), k.float()
    maps = semfid.attention_maps(q, k, select=select, head_reduce="none", backend=backend)
    _, ref = attention_ref(q, k, torch.zeros_like(k), select=select, head_reduce="none")
    torch.testing.assert_close(maps.to(torch.float64), ref, rtol=1e-5, atol=1e-6)


# (B, H, N, M, M_ref, D, head_reduce, detach): ragged rows, returned maps, diffusers' layout, a row
# whose target keys are all -inf, duplicate tokens.
RAGGED_CASES = [
    (2, 3, 17, 7, 7, 40, "mean", True),
    (3, 2, 130, 77, 77, 64, "none", False),
    (2, 5, 1, 7, 9, 8, "mean", False),
    (3, 1, 17, 1, 7, 80, "none", True),
]


def _diffusers_layout(t: torch.Tensor) -> torch.Tensor:
    """The same values as a transposed view of a [B, N, H*D] tensor, as diffusers hands them over."""
    B, H, N, D = t.shape
    return t.transpose(1, 2).reshape(B, N, H * D).view(B, N, H, D).transpose(1, 2)


@pytest.mark.parametrize("backend", backends_under_test())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", RAGGED_CASES, ids=lambda c: "B{}H{}N{}M{}Mr{}D{}-{}-detach{}".format(*c))
def test_subject_attention_ragged_maps_views(shape, dtype, backend):
    B, H, N, M, M_ref, D, head_reduce, detach = shape
    q, k, v, k_ref = (torch.randn(B, H, n, D, device=DEVICE).to(dtype) for n in (N, M, M, M_ref))
    lengths = [1 + (b * 2) % 4 for b in range(B)]  # rows of 1, 3, 2 tokens
    tokens = [torch.randint(0, M, (n,)).tolist() for n in lengths]
    tokens[0] = tokens[0] + tokens[0][:1] if len(tokens[0]) < 4 else tokens[0]  # a duplicate
    lengths[0] = len(tokens[0])
    ref_tokens = [torch.randint(0, M_ref, (n,)).tolist() for n in lengths]
    bias = torch.zeros(B, 1, M, device=DEVICE)
    bias[-1] = float("-inf")  # the last row's target keys are all masked: P = 0 there
    ref_bias = torch.zeros(B, 1, M_ref, device=DEVICE)
    ref_bias[0, :, M_ref // 2:] = -10000.0
    kw = dict(tokens=tokens, ref_tokens=ref_tokens, attn_bias=bias, ref_attn_bias=ref_bias,
              head_reduce=head_reduce, detach_reference=detach, return_maps=True)

    ins = [_leaf(_diffusers_layout(t)) for t in (q, k, v, k_ref)]
    got = semfid.subject_attention(*ins, backend=backend, **kw)
    ins64 = [_leaf(t.to(torch.float64)) for t in (q, k, v, k_ref)]
    ref = subject_ref(*ins64, **kw)
    insp = [_leaf(t) for t in (q, k, v, k_ref)]
    plain = subject_ref(*insp, upcast=False, **kw)
    assert got[0].transpose(1, 2).is_contiguous(), "out must merge heads as a view"
    for name, g, r, p in zip(("out", "loss", "maps"), got, ref, plain):
        assert_close_rule(f"{name} ({backend}, {dtype})", g, r, p, atol=_tolerance(dtype, r))
    upstream = [torch.randn(ref[0].shape, dtype=torch.float64, device=DEVICE),
                torch.full((B,), 1e3, dtype=torch.float64, device=DEVICE),
                torch.randn(ref[2].shape, dtype=torch.float64, device=DEVICE)]
    grads_got = _grads(got, upstream, ins)
    grads_ref = _grads(ref, upstream, ins64)
    grads_plain = _grads(plain, upstream, insp)
    atol = _tolerance(dtype, *grads_ref)
    for name, g, r, p, x in zip(("dq", "dk", "dv", "dk_ref"), grads_got, grads_ref, grads_plain, ins):
        if name == "dk_ref" and detach:
            assert g is None and r is None
            continue
        assert g.stride() == x.stride(), f"{name} must keep its input's strides"
        assert_close_rule(f"{name} ({backend}, {dtype}, detach={detach})", g, r, p,
                          factor=GRAD_FACTOR, atol=atol)


@pytest.mark.parametrize("backend", backends_under_test())
def test_token_selection_is_reused_without_checks(backend):
    """A TokenSelection built once serves many calls; it equals passing the lists each time."""
    B, H, N, M, D = 2, 2, 9, 7, 8
    q, k, v, k_ref = (torch.randn(B, H, n, D, device=DEVICE) for n in (N, M, M, M))
    rows = [[1, 2, 3], [4]]
    sel = semfid.TokenSelection.build(rows, batch=B, num_keys=M, device=DEVICE)
    assert sel.lengths == (3, 1) and sel.ragged and sel.max_index == 4
    a = semfid.subject_attention(q, k, v, k_ref, tokens=sel, return_maps=True, backend=backend)
    b = semfid.subject_attention(q, k, v, k_ref, tokens=rows, return_maps=True, backend=backend)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert bool((a[2][1, :, 1:] == 0).all()), "ragged padding columns of the maps must be zero"
    _, maps = semfid.cross_attention(q, k, v, select=sel, backend=backend)
    torch.testing.assert_close(maps[..., :1], a[2][..., :1])
    with pytest.raises(ValueError, match="built for batch 2"):
        semfid.subject_attention(q[:1], k[:1], v[:1], k_ref[:1], tokens=sel, backend=backend)
    with pytest.raises(IndexError, match=r"tokens indices must lie in \[0, 3\)"):
        semfid.subject_attention(q, k[:, :, :3], v[:, :, :3], k_ref, tokens=sel, backend=backend)


# The torch backend splits the queries into chunks of ~2 MiB of probabilities, so the shapes
# above run in one chunk. Small chunks make every case walk several (dk / dv accumulated across
# chunks, in both orientations of the narrow products at head dim 8).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case,detach", [(CASES[3], True), (CASES[5], False), (CASES[8], False),
                                         (CASES[9], True), (CASES[10], True)],
                         ids=lambda x: x.id if isinstance(x, Case) else f"detach{x}")
def test_torch_backend_chunked_matches_reference(case: Case, detach: bool, dtype: torch.dtype,
                                                 monkeypatch):
    from semfid.backends import torch as torch_backend

    monkeypatch.setattr(torch_backend, "_BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(torch_backend, "_MIN_CHUNK", 7)  # 17 queries: 2 chunks, 130: 19
    assert torch_backend._chunk_rows(case.B, case.H, 2 * case.M) == 7
    test_subject_attention_matches_reference(case, detach, dtype, "torch")
    for with_select in (True, False):
        test_cross_attention_matches_reference(case, with_select, dtype, "torch")
