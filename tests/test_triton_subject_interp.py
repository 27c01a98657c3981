"""The one-pass Triton subject kernels (``semfid.kernels.subject_fwd`` / ``subject_bwd``) under the
Triton interpreter, against the float64 reference (``semfid.testing.subject_ref``).

Runs inside the ``TRITON_INTERPRET=1`` child process that ``tests/test_triton_interp.py`` starts
(in a plain run every case skips with that reason). Each case: fresh random inputs, allocations
poisoned with NaN, loss / out / maps and every gradient judged by flash-attention's rule (error
<= 2x plain PyTorch's at the dtype, 3x for gradients); masks with -inf (fully masked rows) and
-10000, duplicate tokens, ragged rows, diffusers' transposed views, N in {1, 17, 130}, M in
{1, 7, 77}. Also: the contract's layouts, bitwise-reproducible backward, the launch count of one
subject fwd+bwd, and the device guard.
"""

from __future__ import annotations

import os
import sys
import zlib
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import test_triton_interp as base  # noqa: E402  (module import: its tests are not collected here)
from semfid.testing import subject_ref  # noqa: E402

import semfid  # noqa: E402

inner_only = base.inner_only


@dataclass
class SubjectCase:
    B: int
    H: int
    N: int
    M: int
    M_ref: int
    D: int
    Dv: int
    S: int
    mask: Optional[str] = None  # None | "-inf" | "-10000"
    ragged: bool = False
    transposed: bool = False

    def __str__(self):
        return (f"B{self.B}H{self.H}N{self.N}M{self.M}Mr{self.M_ref}D{self.D}Dv{self.Dv}S{self.S}"
                f"-mask{self.mask}" + ("-ragged" if self.ragged else "") + ("-views" if self.transposed else ""))


MAIN = SubjectCase(2, 2, 17, 7, 9, 40, 24, 3, mask="-inf", ragged=True, transposed=True)
SMALL = SubjectCase(1, 2, 1, 1, 1, 16, 16, 1)
LARGE = SubjectCase(1, 2, 130, 77, 77, 40, 40, 77, mask="-10000", transposed=True)


def make_inputs(case: SubjectCase, dtype: torch.dtype, seed: int):
    """q, k, v, k_ref (leaves, diffusers views when ``transposed``), biases and token lists."""
    g = torch.Generator().manual_seed(seed)

    def rand(B, n, H, d):
        x = torch.randn(B, n, H, d, generator=g).to(dtype)
        return (x.transpose(1, 2) if case.transposed else x.transpose(1, 2).contiguous()).requires_grad_()

    B, H = case.B, case.H
    q, k, v = rand(B, case.N, H, case.D), rand(B, case.M, H, case.D), rand(B, case.M, H, case.Dv)
    k_ref = rand(B, case.M_ref, H, case.D)
    bias = ref_bias = None
    if case.mask is not None:
        fill = float(case.mask)
        bias, ref_bias = torch.zeros(B, 1, case.M), torch.zeros(B, 1, case.M_ref)
        if case.M > 1:
            bias[0, 0, case.M // 2:] = fill  # padding keys of item 0
        if case.M_ref > 1:
            ref_bias[0, 0, case.M_ref - 1:] = fill
        if B > 1:
            bias[B - 1] = fill  # every target key of the last item masked: fully masked rows
    tokens = torch.randint(0, min(case.M, case.M_ref), (B, case.S), generator=g)
    ref_tokens = torch.randint(0, case.M_ref, (B, case.S), generator=g)
    if case.S > 1:
        tokens[:, -1] = tokens[:, 0]  # duplicates
        ref_tokens[:, -1] = ref_tokens[:, 0]
    tokens, ref_tokens = tokens.tolist(), ref_tokens.tolist()
    if case.ragged and B > 1:  # row 0 keeps S tokens, the others one fewer (weight 0 on padding)
        tokens = [tokens[0]] + [row[:-1] for row in tokens[1:]]
        ref_tokens = [ref_tokens[0]] + [row[:-1] for row in ref_tokens[1:]]
    return q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens


def run_case(case, dtype, head_reduce, detach_reference, return_maps=True, use_out=True, use_loss=True):
    seed = zlib.crc32(f"{case}{dtype}{head_reduce}{detach_reference}".encode())
    q, k, v, k_ref, bias, ref_bias, tokens, ref_tokens = make_inputs(case, dtype, seed)
    kw = dict(tokens=tokens, ref_tokens=ref_tokens, attn_bias=bias, ref_attn_bias=ref_bias,
              head_reduce=head_reduce, detach_reference=detach_reference, return_maps=return_maps)
    with base.poisoned_allocations():
        got = semfid.subject_attention(q, k, v, k_ref, backend="triton", **kw)
    ref = subject_ref(q, k, v, k_ref, **kw)
    plain = subject_ref(q, k, v, k_ref, upcast=False, **kw)
    names = ("out", "loss", "maps")[:len(got)]
    for name, g in zip(names, got):
        assert not g.isnan().any(), f"{name}: unwritten (poisoned) elements"
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    base.check_all(names[:1], got[:1], ref[:1], plain[:1], dtype)
    base.check_all(names[1:], got[1:], ref[1:], plain[1:], dtype)

    inputs = (q, k, v) if detach_reference else (q, k, v, k_ref)
    weights = [torch.randn_like(r) if use_out or i else None for i, r in enumerate(ref)]

    def objective(outs):
        total = 0.0
        if use_out:
            total = total + (outs[0].float() * weights[0]).sum()
        if use_loss:
            total = total + 100.0 * outs[1].float().sum()
        if return_maps:
            total = total + (outs[2].float() * weights[2]).sum()
        return total

    with base.poisoned_allocations():
        grads = torch.autograd.grad(objective(got), inputs)
    def zero_unused(gs):  # a reference that did not reach k_ref: its gradient is 0
        return [torch.zeros_like(t, dtype=torch.float64) if g is None else g for t, g in zip(inputs, gs)]

    ref_g = zero_unused(torch.autograd.grad(objective(ref), inputs, allow_unused=True))
    plain_g = zero_unused(torch.autograd.grad(objective(plain), inputs, allow_unused=True))
    for g in grads:
        assert not g.isnan().any(), "unwritten (poisoned) gradient elements"
    labels = ("dq", "dk", "dv", "dk_ref")[:len(inputs)]
    for label, a, r, p in zip(labels, grads, ref_g, plain_g):
        base.assert_close_rule(label, a, r, p, factor=3.0,
                               atol=base.ulp_atol(dtype, float(r.abs().max()) + 1e-3))
    for t, g in zip(inputs, grads):  # every gradient keeps its input's strides
        assert g.stride() == t.stride() and g.dtype == t.dtype
    if case.mask == "-inf" and case.B > 1:  # the last item's target rows are fully masked
        assert torch.all(got[0][-1] == 0)
    return got, grads


@inner_only
@pytest.mark.parametrize("detach_reference", [True, False], ids=["detached", "ref-grad"])
@pytest.mark.parametrize("head_reduce", ["mean", "none"])
@pytest.mark.parametrize("dtype", base.DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_subject_matches_reference(dtype, head_reduce, detach_reference):
    """Ragged rows, -inf masks with fully masked rows, duplicates, diffusers views, M != M_ref."""
    run_case(MAIN, dtype, head_reduce, detach_reference)


@inner_only
@pytest.mark.parametrize("head_reduce", ["mean", "none"])
def test_subject_one_query_one_key(head_reduce):
    run_case(SMALL, torch.float32, head_reduce, detach_reference=False)


@inner_only
@pytest.mark.parametrize("head_reduce", ["mean", "none"])
def test_subject_77_tokens_130_queries(head_reduce):
    """S = 77 selected columns (one-hot products of 128 columns), -10000 padding, 5 row blocks."""
    run_case(LARGE, torch.float16, head_reduce, detach_reference=False)


@inner_only
@pytest.mark.parametrize("use", ["out-only", "loss-only"])
def test_subject_partial_gradients(use):
    """dloss None (only out is used) and dout None (only the loss is used)."""
    run_case(MAIN, torch.float32, "mean", False, return_maps=False, use_out=use == "out-only",
             use_loss=use == "loss-only")


@inner_only
def test_launcher_layouts_and_bitwise_reproducible_backward():
    """The flat launchers' outputs follow CONTRACT.md and a second backward gives the same bits."""
    from semfid import kernels

    case = SubjectCase(2, 2, 130, 7, 9, 40, 24, 3, transposed=True)
    q, k, v, k_ref, *_ = (t.detach() if isinstance(t, torch.Tensor) else t
                          for t in make_inputs(case, torch.float16, 5))
    tokens = torch.tensor([[1, 2, 2], [0, 6, 3]])
    ref_tokens = torch.tensor([3]).expand(2, 3)  # expanded view: row stride 0
    B, H, N, _ = q.shape
    for mean, detach, maps_wanted in ((True, True, False), (True, False, True), (False, True, True)):
        out, lse, lse_ref, loss, maps, diff = kernels.subject_fwd(
            q, k, v, k_ref, None, None, tokens, ref_tokens, None, 0.3, mean, detach, maps_wanted)
        assert out.shape == (B, H, N, 24) and out.transpose(1, 2).is_contiguous()
        assert lse.shape == (B, H, N) and lse.dtype == torch.float32
        assert lse_ref.numel() == (0 if (mean and detach) else B * H * N)
        assert diff.shape == ((B, N, 3) if mean else (0,))
        assert maps.shape == (((B, N, 3) if mean else (B, H, N, 3)) if maps_wanted else (0,))
        assert loss.shape == (B,)
        dout, dloss = torch.randn_like(out), torch.rand(B)
        dmaps = torch.randn_like(maps) if maps_wanted else None
        args = (q, k, v, k_ref, None, None, tokens, ref_tokens, None, 0.3, mean, detach, out, lse,
                lse_ref, diff, dout, dloss, dmaps)
        first = kernels.subject_bwd(*args)
        again = kernels.subject_bwd(*args)
        for t, g in zip((q, k, v), first):
            assert g.stride() == t.stride()
        assert first[3].numel() == (0 if detach else k_ref.numel())
        for a, b in zip(first, again):
            assert torch.equal(a, b)
        rerun = kernels.subject_fwd(q, k, v, k_ref, None, None, tokens, ref_tokens, None, 0.3, mean,
                                    detach, maps_wanted)
        assert torch.equal(rerun[3], loss)


#: aten ops that only allocate or re-view memory: no kernel launch on a GPU.
_NO_LAUNCH = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach",
              "alias", "lift_fresh", "_to_copy_meta"}


def count_launches(fn):
    """(launches, names) while ``fn`` runs: aten ops that launch a kernel (views and allocations
    excluded) plus Triton kernel launches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import triton.runtime.interpreter as interp
    from torch._library.custom_ops import OPDEFS

    names = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if func.namespace == "semfid":  # a custom op: count what its implementation runs
                impl = OPDEFS[func._schema.name]._init_fn
                with Count():
                    return impl(*args, **(kwargs or {}))
            if not func.is_view and name not in _NO_LAUNCH:
                names.append(f"aten.{name}")
            return func(*args, **(kwargs or {}))

    real_getitem = interp.InterpretedFunction.__getitem__

    def getitem(self, grid):
        launch = real_getitem(self, grid)

        def run(*args, **kwargs):
            names.append(f"triton.{self.fn.__name__}")
            with torch.utils._python_dispatch._disable_current_modes():  # the interpreter's own copies
                return launch(*args, **kwargs)
        return run

    interp.InterpretedFunction.__getitem__ = getitem
    try:
        with Count():
            fn()
    finally:
        interp.InterpretedFunction.__getitem__ = real_getitem
    return len(names), names


@inner_only
@pytest.mark.parametrize("detach_reference", [True, False])
def test_launches_per_subject_fwd_bwd(detach_reference):
    """One subject fwd+bwd on the Triton path: <= 8 launches (issue 10; 15 before the one-pass op).

    Counted from the public call to the gradients, with q/k/v/k_ref as diffusers views and the
    upstream gradients given (the user's own loss arithmetic is not semfid's)."""
    q, k, v, k_ref, bias, _, tokens, ref_tokens = make_inputs(
        SubjectCase(2, 2, 17, 7, 7, 40, 40, 2, mask="-10000", transposed=True), torch.float16, 3)
    dout = torch.randn(2, 2, 17, 40, dtype=torch.float16)
    dloss = torch.ones(2)
    inputs = (q, k, v) if detach_reference else (q, k, v, k_ref)

    def step():
        out, loss = semfid.subject_attention(q, k, v, k_ref, tokens=[0, 3], attn_bias=bias,
                                             detach_reference=detach_reference, backend="triton")
        torch.autograd.grad((out, loss), inputs, (dout, dloss))

    step()  # warm: selection cache, first compile of the interpreter's launcher
    n, names = count_launches(step)
    print(f"\nlaunches per subject fwd+bwd (triton, detach_reference={detach_reference}): {n}: {names}")
    assert any(name.startswith("triton._subject_fwd") for name in names)
    assert n <= 8, names


@inner_only
def test_launches_run_under_the_device_guard_of_q(monkeypatch):
    """Every launcher enters its device guard with q (on a GPU: ``torch.cuda.device(q.device)``,
    so a q on cuda:1 launches there, on that device's current stream)."""
    import importlib

    from semfid import kernels

    common = importlib.import_module("semfid.kernels._common")
    entered = []
    real_guard = common.device_guard

    def spy(t):
        entered.append(t)
        return real_guard(t)

    modules = [importlib.import_module(f"semfid.kernels.{m}")
               for m in ("subject_fwd", "subject_bwd", "xattn_fwd", "xattn_bwd")]
    for m in modules:
        monkeypatch.setattr(m, "device_guard", spy)
    q, k, v, k_ref = (torch.randn(1, 2, n, 16) for n in (5, 7, 7, 7))
    tok = torch.tensor([[1, 2]])
    res = kernels.subject_fwd(q, k, v, k_ref, None, None, tok, tok, None, 0.25, True, True, False)
    kernels.subject_bwd(q, k, v, k_ref, None, None, tok, tok, None, 0.25, True, True, res[0], res[1],
                        res[2], res[5], torch.ones_like(res[0]), torch.ones(1), None)
    out, lse, maps = kernels.xattn_fwd(q, k, v, None, tok, 0.25, True)
    kernels.xattn_bwd(q, k, v, None, tok, 0.25, True, out, lse, torch.ones_like(out), None)
    assert len(entered) == 4 and all(t is q for t in entered)

    seen = []

    class FakeDevice:  # what torch.cuda.device receives for a CUDA tensor
        def __init__(self, device):
            seen.append(device)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)

    class OnCuda1:
        device = torch.device("cuda", 1)

    with real_guard(OnCuda1()):
        pass
    assert seen == [torch.device("cuda", 1)]
