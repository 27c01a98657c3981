"""The Triton backend under the Triton interpreter (CPU tensors, no GPU).

``TRITON_INTERPRET=1`` must be set before triton is imported, so :func:`test_interpreter_suite` runs
this same file again in a child pytest process with that variable set; the cases below only run in
that child (in the parent they are skipped with a reason). Run the child directly with
``TRITON_INTERPRET=1 pytest tests/test_triton_interp.py``.

Every case: fresh random inputs, outputs and internal buffers poisoned with NaN before the call
(an element the kernels forget to write fails), outputs and all gradients checked against the
float64 reference with the flash-attention rule (error <= 2x plain PyTorch's error at that dtype).
Sizes stay at <= 130 queries: the interpreter runs ~10 ms per program.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import subprocess
import sys
import zlib
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from semfid.testing import assert_close_rule, attention_ref, subject_ref, ulp_atol  # noqa: E402

import semfid  # noqa: E402

INNER = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
inner_only = pytest.mark.skipif(
    not INNER, reason="runs in the TRITON_INTERPRET=1 child process of test_interpreter_suite"
)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: xattn cases (30) + the lse/determinism/fallback/maps-only cases (4) + the subject cases
#: (tests/_triton_subject_cases.py, collected into this file's child run).
EXPECTED_CHILD_CASES = 34 + 22


# ------------------------------------------------------------------------------------------------
# parent: run this file under the interpreter
# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(INNER, reason="this is the child process")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")
def test_interpreter_suite():
    import numpy
    import triton

    version = lambda v: tuple(int(x) for x in re.findall(r"\d+", v)[:2])  # noqa: E731
    assert not (version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4)), (
        f"triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} (TypeError: "
        "only 0-dimensional arrays can be converted to Python scalars): pip install 'numpy<2.4', "
        "as semfid[test] declares")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", __file__,
         os.path.join(os.path.dirname(__file__), "test_triton_subject_interp.py")],
        env=env, capture_output=True, text=True, timeout=1200,
    )
    tail = (res.stdout + res.stderr)[-6000:]
    assert res.returncode == 0, f"interpreter suite failed:\n{tail}"
    passed = re.search(r"(\d+) passed", res.stdout)
    # every case of this file must have run in the child (none skipped there but the parent's two)
    assert passed and int(passed.group(1)) >= EXPECTED_CHILD_CASES and " failed" not in res.stdout, tail


def test_cpu_without_interpreter_is_refused_with_reasons():
    """Outside the interpreter, CPU tensors are refused by name and 'auto' runs another backend."""
    if INNER:
        pytest.skip("CPU tensors are supported under the interpreter")
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    with pytest.raises(ValueError, match="triton") as info:
        semfid.cross_attention(q, k, v, backend="triton")
    assert "device=cpu" in str(info.value)
    torch.testing.assert_close(semfid.cross_attention(q, k, v, backend="auto"),
                               attention_ref(q, k, v).float())


# ------------------------------------------------------------------------------------------------
# child: the cases
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def poisoned_allocations():
    """Make every float torch.empty / empty_like / Tensor.new_empty come back NaN-filled."""
    real_empty, real_new_empty = torch.empty, torch.Tensor.new_empty

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    def empty(*args, **kwargs):
        return poison(real_empty(*args, **kwargs))

    def new_empty(self, *args, **kwargs):
        return poison(real_new_empty(self, *args, **kwargs))

    real_empty_like = torch.empty_like

    def empty_like(*args, **kwargs):
        return poison(real_empty_like(*args, **kwargs))

    torch.empty = empty
    torch.Tensor.new_empty = new_empty
    torch.empty_like = empty_like
    try:
        yield
    finally:
        torch.empty = real_empty
        torch.Tensor.new_empty = real_new_empty
        torch.empty_like = real_empty_like


@dataclass
class Case:
    B: int
    H: int
    N: int
    M: int
    D: int
    Dv: int
    S: int
    per_batch_select: bool = False
    mask: Optional[str] = None  # None | "-inf" | "-10000"
    strided_q: bool = False

    def __str__(self):
        sel = "perbatch" if self.per_batch_select else "shared"
        return (f"B{self.B}H{self.H}N{self.N}M{self.M}D{self.D}Dv{self.Dv}S{self.S}-{sel}"
                f"-mask{self.mask}" + ("-strided" if self.strided_q else ""))


CASES = [
    Case(1, 2, 1, 1, 8, 8, 1),
    Case(2, 2, 17, 7, 40, 40, 3, per_batch_select=True, mask="-inf"),
    Case(2, 3, 130, 77, 40, 24, 2, mask="-10000", strided_q=True),
    Case(1, 2, 33, 77, 80, 80, 4, per_batch_select=True, mask="-inf"),
    Case(1, 2, 17, 77, 160, 160, 2, mask="-inf"),
]


def make_inputs(case: Case, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    B, H, N, M = case.B, case.H, case.N, case.M
    if case.strided_q:  # [B, N, H, D] storage seen as [B, H, N, D]: what diffusers produces
        q = rand(B, N, H, case.D).transpose(1, 2)
    else:
        q = rand(B, H, N, case.D)
    k, v = rand(B, H, M, case.D), rand(B, H, M, case.Dv)
    bias = None
    if case.mask is not None:
        bias = torch.zeros(B, 1, M)
        fill = float(case.mask)
        if M > 1:
            bias[0, 0, M // 2:] = fill  # padding keys of item 0
        if B > 1:
            bias[B - 1, 0, :] = fill  # every key of the last item masked: fully masked rows
    if case.per_batch_select:
        select = torch.randint(0, M, (B, case.S), generator=g)
        select[:, -1] = select[:, 0]  # a duplicate in every row
    else:
        select = [min(i * 3, M - 1) for i in range(case.S)]  # duplicates when M is small
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), bias, select


def grads_of(outputs, weights, inputs):
    loss = sum((o.float() * w).sum() for o, w in zip(outputs, weights))
    return torch.autograd.grad(loss, inputs)


def check_all(name, got, ref64, plain, dtype):
    """assert_close_rule on each tensor; the atol floor is a few ulps of the group's largest value
    (a gradient that cancels to ~0, e.g. dq with one key, carries rounding of its O(1) terms)."""
    scale = max(float(r.abs().max()) for r in ref64 if r.numel()) + 1e-3
    for label, a, r, p in zip(name, got, ref64, plain):
        assert_close_rule(label, a, r, p, atol=ulp_atol(dtype, scale))


@inner_only
@pytest.mark.parametrize("head_reduce", ["mean", "none"])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_cross_attention_matches_reference(dtype, case, head_reduce):
    q, k, v, bias, select = make_inputs(case, dtype, seed=zlib.crc32(f"{case}{head_reduce}{dtype}".encode()))
    with poisoned_allocations():
        out, maps = semfid.cross_attention(q, k, v, attn_bias=bias, select=select,
                                           head_reduce=head_reduce, backend="triton")
    ref_out, ref_maps = attention_ref(q, k, v, attn_bias=bias, select=select, head_reduce=head_reduce)
    plain_out, plain_maps = attention_ref(q, k, v, attn_bias=bias, select=select,
                                          head_reduce=head_reduce, upcast=False)
    assert out.dtype == dtype and maps.dtype == torch.float32
    assert not out.isnan().any() and not maps.isnan().any(), "unwritten (poisoned) elements"
    check_all(("out", "maps"), (out, maps), (ref_out, ref_maps), (plain_out, plain_maps), dtype)

    w_out, w_maps = torch.randn_like(ref_out), torch.randn_like(ref_maps)
    with poisoned_allocations():
        got = grads_of((out, maps), (w_out, w_maps), (q, k, v))
    ref = grads_of((ref_out, ref_maps), (w_out, w_maps), (q, k, v))
    plain = grads_of((plain_out, plain_maps), (w_out, w_maps), (q, k, v))
    for gr in got:
        assert not gr.isnan().any(), "unwritten (poisoned) gradient elements"
    check_all(("dq", "dk", "dv"), got, ref, plain, dtype)

    if case.mask == "-inf" and case.B > 1:  # the last item's rows are fully masked
        assert torch.all(out[-1] == 0) and torch.all(maps[-1] == 0)
        assert torch.all(got[0][-1] == 0) and torch.all(got[1][-1] == 0)


@inner_only
def test_maps_only_pass_and_no_select():
    q, k, v, bias, select = make_inputs(Case(2, 2, 17, 7, 40, 40, 2, mask="-inf"), torch.float32, 3)
    maps = semfid.attention_maps(q, k, select=select, attn_bias=bias, backend="triton")
    ref_maps = attention_ref(q, k, v, attn_bias=bias, select=select)[1]
    torch.testing.assert_close(maps, ref_maps.float(), atol=1e-6, rtol=1e-5)
    (dq, dk) = torch.autograd.grad((maps * torch.linspace(-1, 1, maps.shape[-1])).sum(), (q, k))
    (rq, rk) = torch.autograd.grad((ref_maps * torch.linspace(-1, 1, maps.shape[-1])).sum(), (q, k))
    torch.testing.assert_close(dq, rq.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dk, rk.float(), atol=1e-5, rtol=1e-4)
    out = semfid.cross_attention(q, k, v, attn_bias=bias, backend="triton")
    torch.testing.assert_close(out, attention_ref(q, k, v, attn_bias=bias).float(), atol=1e-5, rtol=1e-5)


@inner_only
def test_backward_is_bitwise_deterministic():
    from semfid import kernels

    q, k, v, bias, select = make_inputs(Case(2, 2, 130, 77, 40, 40, 3, per_batch_select=True),
                                        torch.float16, 11)
    sel = torch.as_tensor(select)
    q, k, v = q.detach(), k.detach(), v.detach()
    bias = bias if bias is None else bias.expand(2, 2, 77)
    out, lse, maps = kernels.xattn_fwd(q, k, v, bias, sel, 0.2, True)
    dout, dmaps = torch.randn_like(out), torch.randn_like(maps)
    first = kernels.xattn_bwd(q, k, v, bias, sel, 0.2, True, out, lse, dout, dmaps)
    for _ in range(2):
        again = kernels.xattn_bwd(q, k, v, bias, sel, 0.2, True, out, lse, dout, dmaps)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@inner_only
def test_lse_convention_and_nan_propagation():
    from semfid import kernels

    q, k, v = torch.randn(1, 1, 4, 16), torch.randn(1, 1, 5, 16), torch.randn(1, 1, 5, 16)
    bias = torch.full((1, 1, 5), float("-inf"))
    _, lse, _ = kernels.xattn_fwd(q, k, v, bias, None, 0.25, False)
    assert torch.all(lse == float("inf"))
    q[0, 0, 1, 3] = float("nan")
    out, lse, maps = kernels.xattn_fwd(q, k, v, None, torch.tensor([[0, 2]]), 0.25, False)
    assert out[0, 0, 1].isnan().all() and maps[0, 0, 1].isnan().all()
    assert not out[0, 0, [0, 2, 3]].isnan().any()


@inner_only
def test_more_than_256_keys_run_the_key_blocked_kernels():
    """(tests/test_triton_joint_interp.py tests those kernels; here: the routing.)"""
    q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)
    out = semfid.cross_attention(q, k, v, backend="triton")
    torch.testing.assert_close(out, attention_ref(q, k, v).float(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"dtype=torch.float64"):
        semfid.cross_attention(q.double(), k[:, :, :7].double(), v[:, :, :7].double(), backend="triton")
