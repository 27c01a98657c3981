"""The CUDA extension ``semfid._C`` (csrc/) and the ``cuda`` backend.

Without a GPU (every development machine and CI): the build configuration, the generated kernel
files, the extension's import and op registration, the honest backend status, the ptxas resource
report (no spills in the forward kernels) and the tensor-core instructions in the SASS. These skip
with a reason when ``semfid._C`` is not built.

With a GPU (``pytest -m gpu tests/test_cuda_ext.py``): the kernels against the float64 reference with
the flash-attention rule (error <= 2x plain PyTorch's error at the same dtype for outputs and maps,
3x for gradients), every head dim, fp16 and bf16, -inf / -10000 key padding and fully masked rows,
odd query counts, per-head and head-mean maps (averaged inside the kernel), the one-pass subject op
(``semfid_C::subject_fwd`` / ``subject_bwd``: loss, out, returned maps and every gradient, both
``detach_reference`` settings, ragged rows, diffusers' transposed views, output layouts), NaN-poisoned
allocator memory (an unwritten element fails), bitwise-identical repeats (race check), launches on
q's device when another one is current, and agreement with the triton backend when it is available.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from semfid.testing import (  # noqa: E402
    assert_close_rule, attention_ref, gather_maps, probabilities, subject_ref, ulp_atol,
)

import semfid  # noqa: E402
from semfid import _cpp_lib  # noqa: E402
from semfid.backends import available_backends, cuda_limits, get_backend  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from csrc import build_config, generate_kernels, resources  # noqa: E402

BUILT = _cpp_lib.is_built()
needs_extension = pytest.mark.skipif(not BUILT, reason=f"semfid._C is not built: {_cpp_lib.unavailable_reason()}")
HEAD_DIMS = cuda_limits.HEAD_DIMS
DTYPES = (torch.float16, torch.bfloat16)
ARCH_SMEM_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}  # max dynamic shared memory per block


# ================================================================================================
# no GPU needed
# ================================================================================================
def test_generated_instantiations_are_up_to_date():
    assert generate_kernels.main(["--check"]) == 0
    assert len(generate_kernels.kernel_files()) == len(generate_kernels.LAUNCHERS) * len(HEAD_DIMS) * len(DTYPES)


def test_limits_header_is_generated_from_the_table():
    """The C++ limits (checks, error messages, HEADDIM_SWITCH) come from semfid.backends.cuda_limits."""
    header = open(os.path.join(ROOT, "csrc", "semfid_limits.h")).read()
    assert header == generate_kernels.limits_header()
    dims = ", ".join(str(d) for d in cuda_limits.HEAD_DIMS)
    assert f"kSupportedHeadDims[] = {{{dims}}}" in header
    assert f"kMaxKeys = {cuda_limits.MAX_KEYS};" in header
    assert f"kMaxSelected = {cuda_limits.MAX_SELECTED};" in header
    for d in cuda_limits.HEAD_DIMS:
        assert f"kHeadDim = {d};" in header


def test_arch_list_parsing(monkeypatch):
    monkeypatch.setenv("SEMFID_CUDA_ARCHS", "80;90a")
    assert build_config._archs() == ["80", "90a"]
    assert build_config._gencode_flags(["80", "90a"])[-1] == "-gencode=arch=compute_90a,code=compute_90a"
    monkeypatch.setenv("SEMFID_CUDA_ARCHS", "75")
    with pytest.raises(SystemExit, match="SEMFID_CUDA_ARCHS"):
        build_config._archs()


def test_build_switch_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv("SEMFID_BUILD_CUDA", "yes")
    with pytest.raises(SystemExit, match="SEMFID_BUILD_CUDA"):
        build_config.cuda_build(ROOT)
    monkeypatch.setenv("SEMFID_BUILD_CUDA", "0")
    assert build_config.cuda_build(ROOT) == ([], {})


def test_ptxas_report_parser():
    log = """
ptxas info    : Compiling entry function '_ZN6semfid16xattn_fwd_kernelINS_19Xattn_kernel_traitsILi64EEE6__halfEEvNS_16Xattn_fwd_paramsE' for 'sm_80'
ptxas info    : Function properties for _ZN6semfid16xattn_fwd_kernelINS_19Xattn_kernel_traitsILi64EEE6__halfEEvNS_16Xattn_fwd_paramsE
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 16 bytes smem, 584 bytes cmem[0]
"""
    (k,) = build_config.parse_ptxas(log)
    assert (k["arch"], k["registers"], k["spill_stores"], k["spill_loads"], k["stack_bytes"], k["static_smem_bytes"]) \
        == ("sm_80", 128, 4, 12, 8, 16)
    assert resources.kernel_label(str(k["kernel"])) == ("xattn_fwd_kernel", 64, "fp16")
    mangled = "_ZN6semfid21subject_bwd_dq_kernelINS_19Xattn_kernel_traitsILi160EEE13__nv_bfloat16EEvNS_18Subject_bwd_paramsE"
    assert resources.kernel_label(mangled) == ("subject_bwd_dq_kernel", 160, "bf16")
    assert resources.kernel_label("semfid::xattn_loss_reduce_kernel(float const*, float*, int, float)")[:2] == \
        ("xattn_loss_reduce_kernel", None)


def test_resources_file_has_one_definition():
    assert build_config.RESOURCES_FILE is resources.RESOURCES_FILE
    assert resources.report_path().endswith(os.path.join("semfid", resources.RESOURCES_FILE))


def test_backend_is_opt_in_and_honest():
    cls = get_backend("cuda")
    assert cls.AUTO_DEVICES == frozenset(), "auto must not pick cuda before the GPU suite passed on a device"
    if BUILT:
        assert cls.unavailable_reason() is None
        assert "not yet timed" in cls.status() and "auto takes it on a GPU where" in cls.status()
        assert "cuda" in available_backends()
    else:
        assert cls.unavailable_reason() is not None
        assert cls.status().startswith(("not built", "built but not loadable"))
        assert "cuda" not in available_backends()


def test_unsupported_inputs_are_explained():
    cls = get_backend("cuda")
    q = torch.zeros(1, 1, 4, 48, dtype=torch.float16)
    inp = semfid._inputs.XattnInputs.validate(q, torch.zeros(1, 1, 200, 48, dtype=torch.float16),
                                              torch.zeros(1, 1, 200, 32, dtype=torch.float16))
    reasons = "; ".join(cls.not_supported_reasons(inp))
    for expected in ("device=cpu", "head_dim=48", "value_dim=32", f"num_keys=200 > {cuda_limits.MAX_KEYS}",
                     f"supported: {list(cuda_limits.HEAD_DIMS)}"):
        assert expected in reasons


def test_subject_inputs_are_explained_without_the_extension():
    """The adapter knows its limits from the table: too many tokens is refused by name."""
    cls = get_backend("cuda")
    q = torch.zeros(1, 1, 4, 64, dtype=torch.float16)
    k = torch.zeros(1, 1, 77, 64, dtype=torch.float16)
    S = cuda_limits.MAX_SELECTED + 1
    inp = semfid._inputs.SubjectInputs.validate(q, k, k, k, tokens=[i % 77 for i in range(S)])
    reasons = "; ".join(cls.not_supported_reasons(inp))
    assert f"num_selected={S} > {cuda_limits.MAX_SELECTED}" in reasons


def test_bias_is_shifted_to_a_zero_row_max_before_the_kernels():
    """The adapter hands the kernels bias minus its largest finite entry per (batch, head) row: the
    same softmax, and a row padded with -10000 on every key becomes exact zeros (the kernels round a
    logit at its bias' magnitude: the H200 self-test's fully masked one-key rows had dk off by 0.15)."""
    from semfid.backends.cuda import _max_shifted

    assert _max_shifted(None) is None
    bias = torch.tensor([[[-10000.0, -10000.0, -10000.0], [0.0, -10000.0, float("-inf")],
                          [float("-inf")] * 3, [-3.0, -5.0, float("-inf")]]])  # [B=1, H=4, M=3]
    shifted = _max_shifted(bias)
    assert torch.equal(shifted[0, 0], torch.zeros(3))
    assert torch.equal(shifted[0, 1], bias[0, 1]) and torch.equal(shifted[0, 2], bias[0, 2])
    assert torch.equal(shifted[0, 3], torch.tensor([0.0, -2.0, float("-inf")]))
    logits = torch.randn(1, 4, 5, 3)
    want = torch.softmax(logits.double() + bias.double()[:, :, None], dim=-1).nan_to_num()
    got = torch.softmax(logits + shifted[:, :, None], dim=-1).nan_to_num()
    assert float((got.double() - want).abs().max()) < 1e-6  # unshifted, float32 is ~1e-4 off on row 0
    expanded = torch.full((2, 1, 4), -10000.0).expand(2, 5, 4)  # diffusers' [B, 1, M] padding, seen per head
    assert torch.equal(_max_shifted(expanded), torch.zeros(2, 5, 4))


@needs_extension
def test_extension_registers_its_ops():
    for name in ("xattn_fwd", "xattn_bwd", "subject_fwd", "subject_bwd", "smem_bytes"):
        assert hasattr(torch.ops.semfid_C, name)
    q = torch.zeros(1, 1, 4, 64, dtype=torch.float16)
    tokens = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(NotImplementedError):  # no CPU kernel: the dispatcher refuses CPU tensors
        torch.ops.semfid_C.xattn_fwd(q, q, q, None, None, 0.125, True)
    with pytest.raises(NotImplementedError):
        torch.ops.semfid_C.subject_fwd(q, q, q, q, None, None, tokens, tokens, None, 0.125, True, True, False)


SMEM_KINDS = ["xattn_fwd", "subject_fwd", "xattn_bwd_dq", "subject_bwd_dq", "bwd_dkdv"]


@needs_extension
@pytest.mark.parametrize("kernel", SMEM_KINDS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_shared_memory_fits_sm80_at_sd_shapes(kernel, head_dim):
    """SD's 77 keys and 77 selected tokens fit one A100 block (163 KiB) for every kernel and head dim;
    the largest limits fit an H100 block (227 KiB) except where the adapter refuses by name."""
    assert 0 < torch.ops.semfid_C.smem_bytes(kernel, head_dim, 77, 77) <= ARCH_SMEM_LIMIT["sm_80"]
    with pytest.raises(RuntimeError, match="num_keys"):
        torch.ops.semfid_C.smem_bytes(kernel, head_dim, cuda_limits.MAX_KEYS + 1, 1)
    with pytest.raises(RuntimeError, match="num_selected"):
        torch.ops.semfid_C.smem_bytes(kernel, head_dim, 77, cuda_limits.MAX_SELECTED + 1)


@needs_extension
def test_resource_report_has_every_kernel_and_no_forward_spills():
    report = resources.load_report()
    assert report is not None, f"missing {resources.report_path()}"
    rows = resources.resource_rows(report)
    archs = {f"sm_{a}" for a in report["archs"]}
    for kernel in ("xattn_fwd_kernel", "xattn_bwd_dq_kernel", "subject_bwd_dq_kernel", "xattn_bwd_dkdv_kernel"):
        for head_dim in HEAD_DIMS:
            for dtype in ("fp16", "bf16"):
                found = {r["arch"] for r in rows if (r["kernel"], r["head_dim"], r["dtype"]) == (kernel, head_dim, dtype)}
                assert found == archs, f"{kernel} hdim{head_dim} {dtype}: compiled for {found}, expected {archs}"
    forward = [r for r in rows if r["kernel"] == "xattn_fwd_kernel"]
    spilling = [r for r in forward if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, f"forward kernels spill registers: {spilling}"
    assert resources.main([]) == 0


@needs_extension
def test_sass_uses_tensor_cores():
    try:
        counts = resources.hmma_counts(resources.extension_path())
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    attention = {key: n for key, n in counts.items() if "reduce" not in key[0]}
    assert any("subject_bwd_dq" in key[0] for key in attention), "the subject dq kernel is missing"
    assert attention, "no kernels found in the SASS"
    assert all(n > 0 for n in attention.values()), {k: n for k, n in attention.items() if n == 0}


# ================================================================================================
# GPU: numerics against the float64 reference
# ================================================================================================
def _inputs(B, H, N, M, D, dtype, *, bias_kind=None):
    dev = "cuda"
    q = torch.randn(B, H, N, D, device=dev, dtype=dtype)
    k = torch.randn(B, H, M, D, device=dev, dtype=dtype)
    v = torch.randn(B, H, M, D, device=dev, dtype=dtype)
    bias = None
    if bias_kind in ("-inf", "-10000"):
        fill = float("-inf") if bias_kind == "-inf" else -10000.0
        bias = torch.zeros(B, 1, M, device=dev)
        bias[:, :, max(1, (2 * M) // 3):] = fill  # pad the last third of the keys, keep >= 1
    elif bias_kind == "fully_masked":
        bias = torch.zeros(B, 1, M, device=dev)
        bias[0] = float("-inf")  # every key of batch item 0 masked: its rows give zeros
    return q, k, v, bias


def _check_against_reference(q, k, v, bias, select, head_reduce, grad_factor=3.0):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, maps = semfid.cross_attention(*leaves, attn_bias=bias, select=select, head_reduce=head_reduce, backend="cuda")
    g_out, g_maps = torch.randn_like(out), torch.randn_like(maps)
    grads = torch.autograd.grad((out, maps), leaves, (g_out, g_maps))

    results = {}
    for name, upcast in (("ref", True), ("plain", False)):
        ls = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        o, m = attention_ref(*ls, attn_bias=bias, select=select, head_reduce=head_reduce, upcast=upcast)
        gs = torch.autograd.grad((o, m), ls, (g_out.to(o.dtype), g_maps.to(m.dtype)))
        results[name] = (o, m, gs)
    (o64, m64, g64), (op, mp, gp) = results["ref"], results["plain"]
    assert_close_rule("out", out, o64, op, atol=ulp_atol(q.dtype))
    assert_close_rule("maps", maps, m64, mp, atol=ulp_atol(torch.float32))
    # atol as the self-test's battery: fp32 ulps at the largest gradient (>= 1). A gradient that is
    # exactly 0 (dq with one key) is still a sum of rounded terms: the H200 gave 5e-7 there.
    scale = max([float(g.abs().max()) for g in g64 if g.numel()] + [1.0])
    for name, got, ref, plain in zip(("dq", "dk", "dv"), grads, g64, gp):
        atol = 16 * torch.finfo(torch.float32).eps * scale
        assert_close_rule(name, got, ref, plain, factor=grad_factor, atol=atol)
    return out, maps, grads


CASES = {
    # name: (B, H, N, M, bias kind, select, head_reduce)
    "N1_M7": (1, 2, 1, 7, None, [0, 3], "mean"),
    "N17_M77_ninf": (2, 3, 17, 77, "-inf", [[1, 5, 40], [0, 2, 76]], "none"),
    "N130_M128_m10000_dup": (2, 2, 130, 128, "-10000", [5, 5, 100, 127], "mean"),
    "N64_M1": (1, 2, 64, 1, None, [0], "none"),
    "N33_M77_fully_masked": (2, 2, 33, 77, "fully_masked", [3, 9], "none"),
}


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_cuda_matches_reference(head_dim, dtype, case):
    B, H, N, M, bias_kind, select, head_reduce = CASES[case]
    q, k, v, bias = _inputs(B, H, N, M, head_dim, dtype, bias_kind=bias_kind)
    out, maps, grads = _check_against_reference(q, k, v, bias, select, head_reduce)
    if bias_kind == "fully_masked":
        assert torch.all(out[0] == 0) and torch.all(maps[0] == 0)
        assert all(torch.all(g[0] == 0) for g in grads)
        _, lse, _ = torch.ops.semfid_C.xattn_fwd(q, k, v, bias.expand(B, H, M), None, head_dim ** -0.5, False)
        assert torch.all(torch.isinf(lse[0]) & (lse[0] > 0)) and torch.all(torch.isfinite(lse[1]))


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("head_dim", [40, 64])
def test_cuda_sd_layer_4096_queries(head_dim):
    """The SD 64x64 latent level: N = 4096 queries, 77 text keys, head-mean maps."""
    q, k, v, bias = _inputs(2, 8, 4096, 77, head_dim, torch.float16, bias_kind="-10000")
    _check_against_reference(q, k, v, bias, [1, 2, 5], "mean")


@pytest.mark.gpu
@needs_extension
def test_cuda_strided_q_keeps_results():
    """q in diffusers' layout ([B, N, H, D] transposed) gives the same bits as a contiguous q."""
    B, H, N, M, D = 2, 4, 70, 77, 64
    q_bnhd = torch.randn(B, N, H, D, device="cuda", dtype=torch.float16)
    k = torch.randn(B, H, M, D, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    a = semfid.cross_attention(q_bnhd.transpose(1, 2), k, v, select=[1], backend="cuda")
    b = semfid.cross_attention(q_bnhd.transpose(1, 2).contiguous(), k, v, select=[1], backend="cuda")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("head_reduce", ["mean", "none"])
def test_cuda_maps_only_pass(head_reduce):
    q, k, _, bias = _inputs(2, 4, 50, 77, 80, torch.bfloat16, bias_kind="-inf")
    qs, ks = q.clone().requires_grad_(), k.clone().requires_grad_()
    maps = semfid.attention_maps(qs, ks, select=[0, 4, 4], attn_bias=bias, head_reduce=head_reduce, backend="cuda")
    g = torch.randn_like(maps)
    dq, dk = torch.autograd.grad(maps, (qs, ks), g)
    refs = []
    for upcast in (True, False):
        ql, kl = q.clone().requires_grad_(), k.clone().requires_grad_()
        m = gather_maps(probabilities(ql, kl, None, bias, upcast), [0, 4, 4], head_reduce)
        refs.append((m, *torch.autograd.grad(m, (ql, kl), g.to(m.dtype))))
    (m64, dq64, dk64), (mp, dqp, dkp) = refs
    assert_close_rule("maps", maps, m64, mp, atol=ulp_atol(torch.float32))
    assert_close_rule("dq", dq, dq64, dqp, factor=3.0, atol=ulp_atol(q.dtype, float(dq64.abs().max())))
    assert_close_rule("dk", dk, dk64, dkp, factor=3.0, atol=ulp_atol(q.dtype, float(dk64.abs().max())))


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("detach_reference", [True, False])
@pytest.mark.parametrize("head_reduce", ["mean", "none"])
def test_cuda_subject_loss(detach_reference, head_reduce):
    B, H, N, M, D = 2, 8, 256, 77, 160
    q, k, v, bias = _inputs(B, H, N, M, D, torch.float16, bias_kind="-10000")
    k_ref = torch.randn_like(k)
    tokens = [4, 5]
    leaves = [t.clone().requires_grad_() for t in (q, k, v, k_ref)]
    out, loss = semfid.subject_attention(*leaves[:3], leaves[3], tokens=tokens, attn_bias=bias, ref_attn_bias=bias,
                                         head_reduce=head_reduce, detach_reference=detach_reference, backend="cuda")
    g_out = torch.randn_like(out)
    grads = torch.autograd.grad((out, loss.sum()), leaves, (g_out, torch.tensor(1e3, device="cuda")), allow_unused=True)
    results = []
    for upcast in (True, False):
        ls = [t.clone().requires_grad_() for t in (q, k, v, k_ref)]
        o, l = subject_ref(*ls, tokens=tokens, attn_bias=bias, ref_attn_bias=bias, head_reduce=head_reduce,
                           detach_reference=detach_reference, upcast=upcast)
        gs = torch.autograd.grad((o, l.sum()), ls, (g_out.to(o.dtype), torch.tensor(1e3, device="cuda", dtype=l.dtype)),
                                 allow_unused=True)
        results.append((o, l, gs))
    (o64, l64, g64), (op, lp, gp) = results
    assert_close_rule("out", out, o64, op, atol=ulp_atol(q.dtype))
    assert_close_rule("loss", loss, l64, lp, atol=ulp_atol(torch.float32, float(l64.abs().max())))
    for name, got, ref, plain in zip(("dq", "dk", "dv", "dk_ref"), grads, g64, gp):
        if ref is None:
            assert got is None or torch.all(got == 0), f"{name} should get no gradient"
            continue
        assert_close_rule(name, got, ref, plain, factor=3.0, atol=ulp_atol(q.dtype, float(ref.abs().max())))


def _poison_allocator(megabytes=512):
    """Fill the caching allocator's free blocks with NaN so that an unwritten output element shows."""
    torch.cuda.synchronize()
    junk = torch.full((megabytes * 2 ** 18,), float("nan"), device="cuda")
    del junk


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_cuda_outputs_written_everywhere(head_dim):
    """Outputs come from NaN-poisoned memory: every element must be written (finite inputs, no
    fully masked rows, so every output is finite)."""
    q, k, v, bias = _inputs(3, 5, 130, 77, head_dim, torch.bfloat16, bias_kind="-inf")
    for head_reduce in ("none", "mean"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        _poison_allocator()
        out, maps = semfid.cross_attention(*leaves, attn_bias=bias, select=[0, 76], head_reduce=head_reduce,
                                           backend="cuda")
        _poison_allocator()
        grads = torch.autograd.grad((out, maps), leaves, (torch.randn_like(out), torch.randn_like(maps)))
        for name, t in zip(("out", "maps", "dq", "dk", "dv"), (out, maps, *grads)):
            assert torch.isfinite(t).all(), f"{name} has unwritten (NaN) elements"


@pytest.mark.gpu
@needs_extension
def test_cuda_is_deterministic():
    """Race check: 20 runs on the same inputs give identical bits for every output and gradient."""
    q, k, v, bias = _inputs(2, 8, 1024, 77, 80, torch.float16, bias_kind="-10000")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    g_out = torch.randn_like(q)
    first = None
    for _ in range(20):
        out, maps = semfid.cross_attention(*leaves, attn_bias=bias, select=[3, 3, 7], head_reduce="mean", backend="cuda")
        g_maps = torch.ones_like(maps)
        grads = torch.autograd.grad((out, maps), leaves, (g_out, g_maps))
        now = [out, maps, *grads]
        if first is None:
            first = [t.clone() for t in now]
        else:
            for name, a, b in zip(("out", "maps", "dq", "dk", "dv"), first, now):
                assert torch.equal(a, b), f"{name} differs between runs"


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_cuda_agrees_with_triton(head_dim):
    if "triton" not in available_backends():
        pytest.skip("the triton backend is not available here")
    q, k, v, bias = _inputs(2, 4, 300, 77, head_dim, torch.float16, bias_kind="-10000")
    results = {}
    for backend in ("cuda", "triton"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, maps = semfid.cross_attention(*leaves, attn_bias=bias, select=[2, 9], head_reduce="none", backend=backend)
        torch.manual_seed(0)
        gs = (torch.randn_like(out), torch.randn_like(maps))
        results[backend] = (out, maps, *torch.autograd.grad((out, maps), leaves, gs))
    ls = [t.clone().requires_grad_() for t in (q, k, v)]
    o64, m64 = attention_ref(*ls, attn_bias=bias, select=[2, 9], head_reduce="none")
    torch.manual_seed(0)
    gs = (torch.randn_like(results["cuda"][0]), torch.randn_like(results["cuda"][1]))
    g64 = torch.autograd.grad((o64, m64), ls, (gs[0].to(o64.dtype), gs[1].to(m64.dtype)))
    for name, c, t, r in zip(("out", "maps", "dq", "dk", "dv"), results["cuda"], results["triton"], (o64, m64, *g64)):
        # both within 2x (outputs) / 3x (gradients) of the other's error against float64
        factor = 2.0 if name in ("out", "maps") else 3.0
        assert_close_rule(f"{name} cuda vs triton", c, r, t, factor=factor, atol=ulp_atol(torch.float16, float(r.abs().max())))


# ================================================================================================
# GPU: the one-pass subject op (semfid_C::subject_fwd / subject_bwd)
# ================================================================================================
def _diffusers_view(B, H, rows, D, dtype):
    """[B, H, rows, D] as diffusers makes it: a transposed view of [B, rows, H * D]."""
    return torch.randn(B, rows, H * D, device="cuda", dtype=dtype).view(B, rows, H, D).transpose(1, 2)


def _subject_tensors(B, H, N, M, D, dtype, *, M_ref=None, requires_grad=False):
    """q, k, v, k_ref in diffusers' layout."""
    sizes = (N, M, M, M if M_ref is None else M_ref)
    return [_diffusers_view(B, H, rows, D, dtype).requires_grad_(requires_grad) for rows in sizes]


def _key_bias(B, M, kind):
    if kind is None:
        return None
    bias = torch.zeros(B, 1, M, device="cuda")
    if kind in ("-inf", "-10000"):
        bias[:, :, max(1, (2 * M) // 3):] = float("-inf") if kind == "-inf" else -10000.0
    elif kind == "fully_masked":
        bias[0] = float("-inf")  # every key of batch item 0 masked: its rows give P = 0
    return bias


def _subject_check(q, k, v, k_ref, *, bias, ref_bias, tokens, ref_tokens, head_reduce, detach_reference, return_maps):
    """semfid.subject_attention(backend="cuda") against the float64 reference: outputs and every gradient."""
    kwargs = dict(tokens=tokens, ref_tokens=ref_tokens, attn_bias=bias, ref_attn_bias=ref_bias,
                  head_reduce=head_reduce, detach_reference=detach_reference, return_maps=return_maps)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, k_ref)]
    got = semfid.subject_attention(*leaves, backend="cuda", **kwargs)
    # a large loss weight, as in training, so the loss gradient is not drowned by the output gradient
    grads_in = [torch.randn_like(got[0]), torch.rand_like(got[1]) * 1e3] + \
               ([torch.randn_like(got[2])] if return_maps else [])
    grads = torch.autograd.grad(got, leaves, grads_in, allow_unused=True)
    results = []
    for upcast in (True, False):
        ls = [t.detach().clone().requires_grad_() for t in (q, k, v, k_ref)]
        ref = subject_ref(*ls, upcast=upcast, **kwargs)
        gs = torch.autograd.grad(ref, ls, [g.to(r.dtype) for g, r in zip(grads_in, ref)], allow_unused=True)
        results.append((ref, gs))
    (r64, g64), (rp, gp) = results
    names = ("out", "loss", "maps")[:len(got)]
    for name, a, b64, bp in zip(names, got, r64, rp):
        atol = ulp_atol(q.dtype) if name == "out" else ulp_atol(torch.float32, float(b64.abs().max()))
        assert_close_rule(name, a, b64, bp, atol=atol)
    for name, a, b64, bp in zip(("dq", "dk", "dv", "dk_ref"), grads, g64, gp):
        if b64 is None:
            assert a is None or torch.all(a == 0), f"{name} should get no gradient"
            continue
        assert_close_rule(name, a, b64, bp, factor=3.0, atol=ulp_atol(q.dtype, float(b64.abs().max())))
    return got, grads


SUBJECT_CASES = {
    # name: (B, H, N, M, M_ref, bias kind, tokens, ref_tokens, head_reduce, detach_reference, return_maps)
    "N1_M7_mean_detached": (1, 2, 1, 7, 7, None, [0, 3], None, "mean", True, False),
    "N17_M77_none_live_ninf_maps": (2, 3, 17, 77, 77, "-inf", [[1, 5, 40], [0, 2, 76]], [[2, 5, 7], [1, 1, 3]],
                                    "none", False, True),
    "N130_M77_Mref7_mean_live_dup": (2, 2, 130, 77, 7, "-10000", [5, 5, 60], [0, 6, 6], "mean", False, True),
    "N64_M1_none_detached": (1, 2, 64, 1, 1, None, [0], None, "none", True, False),
    "N33_ragged_fully_masked": (2, 2, 33, 77, 77, "fully_masked", [[3, 9, 10], [4]], [[1, 2, 3], [5]], "mean", False,
                                True),
    "N130_M128_none_detached_ragged": (2, 2, 130, 128, 100, "-10000", [[1, 127], [3]], [[0, 99], [7]], "none", True,
                                       True),
}


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("case", list(SUBJECT_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_cuda_subject_matches_reference(head_dim, dtype, case):
    """q, k, v, k_ref as diffusers' transposed views, masks, ragged rows, both detach modes."""
    B, H, N, M, M_ref, bias_kind, tokens, ref_tokens, head_reduce, detach, return_maps = SUBJECT_CASES[case]
    q, k, v, k_ref = _subject_tensors(B, H, N, M, head_dim, dtype, M_ref=M_ref)
    got, grads = _subject_check(q, k, v, k_ref, bias=_key_bias(B, M, bias_kind), ref_bias=_key_bias(B, M_ref, bias_kind),
                                tokens=tokens, ref_tokens=ref_tokens, head_reduce=head_reduce,
                                detach_reference=detach, return_maps=return_maps)
    if bias_kind == "fully_masked":
        assert torch.all(got[0][0] == 0) and torch.all(got[2][0] == 0)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("head_dim", [40, 64])
@pytest.mark.parametrize("head_reduce", ["mean", "none"])
def test_cuda_subject_sd_layer_4096_queries(head_dim, head_reduce):
    """The SD 64x64 level: many query blocks per loss partial sum, 77 keys, -10000 padding."""
    B, H, N, M = 2, 8, 4096, 77
    q, k, v, k_ref = _subject_tensors(B, H, N, M, head_dim, torch.float16)
    bias = _key_bias(B, M, "-10000")
    _subject_check(q, k, v, k_ref, bias=bias, ref_bias=bias, tokens=[5, 6], ref_tokens=None, head_reduce=head_reduce,
                   detach_reference=True, return_maps=False)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("op", ["subject", "xattn"])
def test_cuda_layouts_need_no_copies(op):
    """out has [B, N, H, D] memory (the processor's reshape is a view); gradients keep their inputs' strides."""
    B, H, N, M, D = 2, 4, 70, 77, 64
    q, k, v, k_ref = _subject_tensors(B, H, N, M, D, torch.float16, requires_grad=True)
    if op == "subject":
        out, loss = semfid.subject_attention(q, k, v, k_ref, tokens=[1, 2], detach_reference=False, backend="cuda")
        leaves, outputs = (q, k, v, k_ref), (out, loss.sum())
    else:
        out, maps = semfid.cross_attention(q, k, v, select=[1, 2], backend="cuda")
        leaves, outputs = (q, k, v), (out, maps.sum())
    merged = out.transpose(1, 2).reshape(B, N, H * D)
    assert merged.data_ptr() == out.data_ptr() and merged._base is not None, "out must reshape as a view"
    grads = torch.autograd.grad(outputs, leaves, (torch.randn_like(out), torch.ones((), device="cuda")))
    for leaf, grad in zip(leaves, grads):
        assert grad.stride() == leaf.stride(), (grad.stride(), leaf.stride())


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("head_reduce", ["mean", "none"])
def test_cuda_subject_is_deterministic(head_reduce):
    """Race check: repeated runs give identical bits for out, loss (fixed-order reduction) and every gradient."""
    B, H, N, M, D = 2, 8, 1024, 77, 80
    q, k, v, k_ref = _subject_tensors(B, H, N, M, D, torch.float16, requires_grad=True)
    g_out = torch.randn(B, H, N, D, device="cuda", dtype=torch.float16)
    first = None
    for _ in range(10):
        out, loss, maps = semfid.subject_attention(q, k, v, k_ref, tokens=[3, 3, 7], head_reduce=head_reduce,
                                                   detach_reference=False, return_maps=True, backend="cuda")
        grads = torch.autograd.grad((out, loss, maps), (q, k, v, k_ref),
                                    (g_out, torch.full_like(loss, 1e3), torch.ones_like(maps)))
        now = [out, loss, maps, *grads]
        if first is None:
            first = [t.clone() for t in now]
            continue
        for name, a, b in zip(("out", "loss", "maps", "dq", "dk", "dv", "dk_ref"), first, now):
            assert torch.equal(a, b), f"{name} differs between runs"


@pytest.mark.gpu
@needs_extension
def test_cuda_subject_outputs_written_everywhere():
    """Outputs and gradients come from NaN-poisoned memory: every element must be written."""
    B, H, N, M, D = 3, 5, 130, 77, 40
    q, k, v, k_ref = _subject_tensors(B, H, N, M, D, torch.bfloat16)
    bias = _key_bias(B, M, "-inf")
    for head_reduce in ("none", "mean"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, k_ref)]
        _poison_allocator()
        got = semfid.subject_attention(*leaves, tokens=[0, 50], attn_bias=bias, ref_attn_bias=bias,
                                       head_reduce=head_reduce, detach_reference=False, return_maps=True,
                                       backend="cuda")
        _poison_allocator()
        grads = torch.autograd.grad(got, leaves, (torch.randn_like(got[0]), torch.ones_like(got[1]),
                                                  torch.randn_like(got[2])))
        for name, t in zip(("out", "loss", "maps", "dq", "dk", "dv", "dk_ref"), (*got, *grads)):
            assert torch.isfinite(t).all(), f"{name} has unwritten (NaN) elements ({head_reduce})"


@pytest.mark.gpu
@needs_extension
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_runs_on_the_device_of_q():
    """q on cuda:1 while cuda:0 is current: same bits as with cuda:1 current (device guard, its stream)."""
    B, H, N, M, D = 2, 4, 100, 77, 64
    torch.manual_seed(0)
    tensors = [torch.randn(B, H, n, D, dtype=torch.float16) for n in (N, M, M, M)]
    results = []
    for current in (0, 1):
        with torch.cuda.device(current):
            leaves = [t.to("cuda:1").requires_grad_() for t in tensors]
            out, loss = semfid.subject_attention(*leaves, tokens=[1, 2], detach_reference=False, backend="cuda")
            grads = torch.autograd.grad((out, loss.sum()), leaves, (torch.ones_like(out), torch.ones((), device="cuda:1")))
            torch.cuda.synchronize("cuda:1")
            results.append([out, loss, *grads])
    for a, b in zip(*results):
        assert a.device == torch.device("cuda:1") and torch.equal(a, b)


_HASH_SCRIPT = """
import hashlib, torch, semfid
torch.manual_seed(0)
B, H, N, M, D = 2, 8, 1024, 77, 64
q, k, v, k_ref = (torch.randn(B, n, H * D, device="cuda", dtype=torch.float16).view(B, n, H, D).transpose(1, 2)
                  .requires_grad_() for n in (N, M, M, M))
out, loss = semfid.subject_attention(q, k, v, k_ref, tokens=[1, 5], detach_reference=False, backend="cuda")
grads = torch.autograd.grad((out, loss.sum()), (q, k, v, k_ref), (torch.ones_like(out), torch.ones((), device="cuda")))
print(hashlib.sha256(b"".join(g.detach().cpu().contiguous().numpy().tobytes() for g in grads)).hexdigest())
"""


@pytest.mark.gpu
@needs_extension
def test_cuda_gradients_identical_in_two_processes():
    """dk / dv / dk_ref splits come from the shapes only: two fresh processes give the same bits."""
    import subprocess

    digests = [subprocess.run([sys.executable, "-c", _HASH_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                              check=True, timeout=300).stdout.strip() for _ in range(2)]
    assert digests[0] and digests[0] == digests[1]
