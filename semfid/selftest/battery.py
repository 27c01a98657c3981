"""The fixed battery of the self-test: every op, forward and backward, against float64.

Each case draws seeded random inputs (on the CPU, then moved: the same numbers on every device),
runs one public op with ``backend=<name>`` and checks every output and gradient with
flash-attention's rule against :mod:`semfid.testing`'s float64 reference computed on the same
device: error <= 2x plain PyTorch's error at the same dtype for outputs, maps and loss, 3x for
gradients. A case the backend declares unsupported (``not_supported_reasons``) is skipped: ``auto``
would never send it there.

The full battery (GPUs) covers, for every head dim the backend supports: N in {1, 130, 4096},
M in {1, 77}, S in {1, 7, 77}, head_reduce mean/none, -inf and -10000 padding including fully
masked rows, fp16 and bf16, diffusers' transposed q/k/v views, cross_attention (with and without
maps), attention_maps (the maps-only backward, also at 4096 queries) and subject_attention with
the reference detached and not; and joint key sets (:func:`joint_cases`, head dims 64 / 72 / 128):
Flux's [text, image] and SD3's [image, text] layouts at 4096 image tokens (maps over the image
queries, the reference replacing the text segment with a text of another length) and 300-key
cross-attention, which Triton runs on its key-blocked kernels. The quick battery (the Triton
interpreter, CPU tests) keeps the same structure at <= 40 queries and two head dims.
"""

from __future__ import annotations

import hashlib
import time
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import semfid
from semfid.testing import assert_close_rule, attention_ref, subject_ref

Tensor = torch.Tensor
DEFAULT_HEAD_DIMS = (40, 64, 80, 160)
HEAD_DIMS = {"triton": DEFAULT_HEAD_DIMS, "cuda": (40, 64, 80, 128, 160)}
JOINT_HEAD_DIMS = (64, 72, 128)
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Case:
    op: str          # xattn | maps | subject
    D: int
    N: int
    M: int
    S: int           # selected tokens; 0 = cross_attention without maps
    head_reduce: str
    bias: str        # none | neg_inf | neg_10000 | dead (batch row 0 all -inf) | dead_10000
    dtype: str
    transposed: bool  # diffusers' layout: views of [B, N, H*D]
    detach: bool = True
    B: int = 2
    H: int = 3
    #: Joint key set (diffusion transformers): ``text`` of the N = M tokens are text, first
    #: (Flux, ``text_first``) or last (SD3); maps over the image queries and the text columns, the
    #: reference replacing the text keys (with text + 5 keys). 0: UNet-style cross-attention.
    text: int = 0
    text_first: bool = False

    @property
    def id(self) -> str:
        extra = ("-detach" if self.detach else "-grad_ref") if self.op == "subject" else ""
        joint = f"-joint{'TI' if self.text_first else 'IT'}{self.text}" if self.text else ""
        return (f"{self.op}-D{self.D}-N{self.N}-M{self.M}-S{self.S}-{self.head_reduce}-{self.bias}-"
                f"{self.dtype}{'-diffusers' if self.transposed else ''}{extra}{joint}")

    def text_keys(self) -> Tuple[int, int]:
        return (0, self.text) if self.text_first else (self.M - self.text, self.M)

    def image_queries(self) -> Tuple[int, int]:
        return (self.text, self.N) if self.text_first else (0, self.N - self.text)


def joint_cases(quick: bool) -> List[Case]:
    """Joint key sets and long keys (the key-blocked kernels of Triton): Flux's [text, image] and
    SD3's [image, text] layouts at 1024 px (4096 image tokens), PixArt-like 300 keys; head dims
    of SD3 / PixArt-Σ / Flux."""
    if quick:
        return [
            Case("subject", 72, 40, 40, 3, "mean", "neg_inf", "float16", True, detach=False, text=9,
                 text_first=True, H=2),
            Case("xattn", 64, 30, 270, 2, "none", "dead", "bfloat16", True, H=2),
        ]
    out: List[Case] = []
    for D in JOINT_HEAD_DIMS:
        out += [
            Case("xattn", D, 4608, 4608, 4, "mean", "none", "float16", True, text=512, text_first=True),
            Case("maps", D, 4429, 4429, 3, "none", "neg_inf", "bfloat16", True, text=333),
            Case("subject", D, 4608, 4608, 4, "mean", "neg_inf", "bfloat16", True, text=512, text_first=True),
            Case("subject", D, 1100, 1100, 32, "none", "neg_10000", "float16", True, detach=False, text=300),
            Case("xattn", D, 130, 300, 7, "none", "dead", "float16", True),
            Case("subject", D, 130, 300, 7, "mean", "dead_10000", "float16", True, detach=False),
        ]
    return out


def cases(backend: str, quick: bool) -> List[Case]:
    """The battery for ``backend`` (full on a GPU, quick under the interpreter / in tests)."""
    dims = HEAD_DIMS.get(backend, DEFAULT_HEAD_DIMS)
    out: List[Case] = []
    if quick:
        for D in dims[:2]:
            out += [
                Case("xattn", D, 17, 7, 3, "mean", "dead", "float16", True),
                Case("maps", D, 1, 1, 1, "none", "none", "bfloat16", False),
                Case("subject", D, 17, 7, 3, "none", "neg_10000", "float16", True, detach=False),
                Case("subject", D, 9, 7, 2, "mean", "dead_10000", "bfloat16", False),
            ]
        return out + joint_cases(quick)
    for D in dims:
        out += [
            Case("xattn", D, 130, 77, 7, "mean", "dead", "float16", True),
            Case("xattn", D, 4096, 77, 77, "none", "neg_inf", "float16", True),
            Case("xattn", D, 130, 1, 0, "mean", "none", "bfloat16", True),
            Case("maps", D, 1, 1, 1, "mean", "none", "bfloat16", False),
            Case("maps", D, 4096, 77, 1, "none", "dead", "float16", False),
            Case("subject", D, 4096, 77, 77, "none", "neg_10000", "bfloat16", True),
            Case("subject", D, 130, 77, 7, "mean", "neg_inf", "float16", True, detach=False),
            Case("subject", D, 1, 1, 1, "mean", "dead_10000", "bfloat16", False, detach=False),
        ]
    return out + joint_cases(quick)


# ---- inputs ---------------------------------------------------------------------------------
def _gen(case_id: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(case_id.encode()))


def _tensor(g: torch.Generator, case: Case, n: int, d: int, device) -> Tensor:
    B, H = case.B, case.H
    if case.transposed:
        t = torch.randn(B, n, H * d, generator=g).view(B, n, H, d).transpose(1, 2)
    else:
        t = torch.randn(B, H, n, d, generator=g)
    return t.to(device=device, dtype=_DTYPES[case.dtype])


def _bias(g: torch.Generator, case: Case, M: int, device) -> Optional[Tensor]:
    """[B, 1, M]: random trailing keys masked (at least one kept), batch row 0 all masked for
    the dead kinds."""
    if case.bias == "none":
        return None
    fill = -10000.0 if case.bias in ("neg_10000", "dead_10000") else float("-inf")
    bias = torch.zeros(case.B, 1, M)
    for b in range(case.B):
        bias[b, 0, int(torch.randint(1, M + 1, (), generator=g)):] = fill
    if case.bias.startswith("dead"):
        bias[0] = fill
    return bias.to(device)


def _leaf(t: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    return t.detach().to(dtype or t.dtype).requires_grad_(True)


def _call(case: Case, ins: Sequence[Tensor], kw: dict, backend: Optional[str], upcast: bool):
    """The op under test (``backend`` given) or the reference (``upcast`` float64 / plain)."""
    if case.op == "subject":
        if backend is not None:
            return semfid.subject_attention(*ins, return_maps=True, backend=backend, **kw)
        return subject_ref(*ins, return_maps=True, upcast=upcast, **kw)
    q, k = ins[0], ins[1]
    if backend is not None:
        if case.op == "maps":
            return (semfid.attention_maps(q, k, backend=backend, **kw),)
        got = semfid.cross_attention(q, k, ins[2], backend=backend, **kw)
        return got if isinstance(got, tuple) else (got,)
    ref = attention_ref(q, k, ins[2] if case.op == "xattn" else None, upcast=upcast, **kw)
    ref = ref if isinstance(ref, tuple) else (ref,)
    return ref[1:] if case.op == "maps" else ref


def _names(case: Case) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    if case.op == "subject":
        return ("out", "loss", "maps"), ("dq", "dk", "dv", "dk_ref")
    if case.op == "maps":
        return ("maps",), ("dq", "dk")
    return ("out",) + (("maps",) if case.S else ()), ("dq", "dk", "dv")


def _inputs(case: Case, device) -> Tuple[List[Tensor], dict, torch.Generator]:
    g = _gen(case.id)
    q = _tensor(g, case, case.N, case.D, device)
    k = _tensor(g, case, case.M, case.D, device)
    ins = [q, k]
    kw: Dict[str, object] = dict(attn_bias=_bias(g, case, case.M, device), head_reduce=case.head_reduce)
    t0, t1 = case.text_keys() if case.text else (0, case.M)
    sel = torch.randint(t0, t1, (case.B, max(case.S, 1)), generator=g).to(device)
    if case.text:
        kw["map_queries"] = case.image_queries()
    if case.op == "subject":
        M_ref = (t1 - t0) + (5 if case.text else 1)
        ins += [_tensor(g, case, case.M, case.D, device), _tensor(g, case, M_ref, case.D, device)]
        ref_sel = torch.randint(t0, t0 + M_ref, sel.shape, generator=g).to(device)
        kw.update(tokens=sel, ref_tokens=ref_sel, ref_attn_bias=_bias(g, case, M_ref, device),
                  detach_reference=case.detach)
        if case.text:
            kw["ref_segment"] = (t0, t1)
    else:
        if case.op == "xattn":
            ins.append(_tensor(g, case, case.M, case.D, device))
        kw["select"] = sel if case.S else None
    return ins, kw, g


def _upstream(g: torch.Generator, refs: Sequence[Tensor], names: Sequence[str]) -> List[Tensor]:
    ups = []
    for name, r in zip(names, refs):
        u = torch.randn(r.shape, generator=g, dtype=torch.float64)
        ups.append((u * 1e3 if name == "loss" else u).to(r.device))  # loss grads ~ output grads
    return ups


def _grads(outputs, upstream, inputs) -> List[Optional[Tensor]]:
    total = sum((o.to(torch.float64) * u).sum() for o, u in zip(outputs, upstream))
    return list(torch.autograd.grad(total, inputs, allow_unused=True))


def _atol(refs) -> float:
    scale = max([float(r.detach().abs().max()) for r in refs if r is not None and r.numel()] + [1.0])
    return 16 * torch.finfo(torch.float32).eps * scale


def run_case(case: Case, backend: str, device) -> Tuple[str, str]:
    """("pass" | "fail" | "skip", message) for one case."""
    ins, kw, g = _inputs(case, device)
    out_names, grad_names = _names(case)
    leaves = [_leaf(t) for t in ins]
    try:
        got = _call(case, leaves, kw, backend, upcast=False)
    except ValueError as exc:
        if "was requested but cannot run" in str(exc):
            return "skip", str(exc).splitlines()[-1].strip()
        raise
    ins64 = [_leaf(t, torch.float64) for t in ins]
    insp = [_leaf(t) for t in ins]
    ref = _call(case, ins64, kw, None, upcast=True)
    plain = _call(case, insp, kw, None, upcast=False)
    for name, a, r, p in zip(out_names, got, ref, plain):
        assert_close_rule(name, a, r, p, atol=_atol([r]))
    ups = _upstream(g, ref, out_names)
    g_got, g_ref, g_plain = _grads(got, ups, leaves), _grads(ref, ups, ins64), _grads(plain, ups, insp)
    atol = _atol(g_ref)
    for name, a, r, p in zip(grad_names, g_got, g_ref, g_plain):
        if r is None and (a is None or not a.count_nonzero()):
            continue  # dk_ref of a detached reference
        assert_close_rule(name, a, r, p, factor=3.0, atol=atol)
    return "pass", ""


def digest(backend: str, device, quick: bool) -> str:
    """SHA-256 of dq, dk, dv, dk_ref of one fixed subject case: equal in every process and run
    when the backward is deterministic (no autotune- or SM-count-dependent accumulation order)."""
    D, N, M = HEAD_DIMS.get(backend, DEFAULT_HEAD_DIMS)[0], 17 if quick else 4096, 7 if quick else 77
    for op in ("subject", "xattn"):  # the cross_attention pass when there is no fused subject op
        case = Case(op, D, N, M, 7 if M > 7 else 3, "mean", "neg_inf", "float16", True, detach=False)
        ins, kw, g = _inputs(case, device)
        leaves = [_leaf(t) for t in ins]
        try:
            got = _call(case, leaves, kw, backend, upcast=False)
        except ValueError as exc:
            if "was requested but cannot run" in str(exc):
                continue
            raise
        h = hashlib.sha256()
        for t in _grads(got, _upstream(g, got, _names(case)[0]), leaves):
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()
    return "unsupported"


def run_battery(backend: str, device, quick: bool, log=None) -> dict:
    """Run every case; the result record the child process reports (JSON-serialisable)."""
    start = time.monotonic()
    failures, skipped, passed = [], [], 0
    for case in cases(backend, quick):
        try:
            status, message = run_case(case, backend, device)
        except AssertionError as exc:
            status, message = "fail", str(exc).splitlines()[0]
        except Exception as exc:  # a kernel error is a failed case, not a crashed battery
            status, message = "fail", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if status == "pass":
            passed += 1
        elif status == "skip":
            skipped.append(case.id)
        else:
            failures.append(f"{case.id}: {message}")
        if log is not None:
            log(f"{status:4s} {case.id} {message}")
    try:
        first = digest(backend, device, quick)
        if first != digest(backend, device, quick):
            failures.append("determinism: dq/dk/dv differ between two runs in one process")
    except Exception as exc:
        first = "error"
        failures.append(f"determinism case: {type(exc).__name__}: {exc}".splitlines()[0])
    return {"passed_cases": passed, "skipped": skipped, "failures": failures, "digest": first,
            "seconds": round(time.monotonic() - start, 2)}
