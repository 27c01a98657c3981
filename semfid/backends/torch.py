"""The portable, memory-efficient PyTorch backend (CPU and CUDA, every dtype).

Short key sets (the UNet's 77 text keys, up to ``LONG_KEYS``) walk the queries in chunks, so the
largest temporary is one [B, H, chunk, M] block of probabilities (≈2 MiB) and nothing of size
[B, H, N, M] is ever kept: backward recomputes P from q and k (cross-attention:
:mod:`semfid.backends.torch_xattn`). Chunks are computed in float32 (float64 for float64 inputs),
so half-precision inputs get fp32 softmax and accumulation.

Long and joint key sets (more than ``LONG_KEYS`` keys, or ``map_queries`` / ``ref_segment``
other than the full ranges) run :mod:`semfid.backends.joint` (the split lse, maps from lse), whose
attention is blocked over queries *and* keys: on CPU tensors in eager mode whole-row products
through oneDNN and the C++ core's row kernels for float32 (:mod:`semfid.backends.gemm_attention`)
and PyTorch's fused CPU flash-attention kernels for other dtypes, else the online softmax in
PyTorch (:class:`~.primitives.Blocked`: logit blocks of at most ``primitives.BLOCK_ELEMENTS``
elements, 2 MiB in fp32).

The subject op runs both key sets through the same ops: ``[k, k_ref]`` is one key tensor of
2·M' keys (M' = max(M, M_ref); the shorter set is padded with keys masked by -inf), so one matmul
gives both logit blocks, one softmax over a [.., 2, M'] view normalises them separately, one
gather picks A_t and A_r, and in backward one matmul ``dS₂ · [k, k_ref]`` sums both paths into dq.
Its logit scale is folded into the query chunk (one strided-gather-and-scale pass), so
``dSᵀ · (q · scale)`` is dK whole.

On CPU tensors the subject op runs in the C++ core ``semfid._cpu_ops`` (csrc/cpu/subject_core.cpp),
a line-by-line port of the Python code below that gives the same bits: a small layer is a few
dozen ATen calls, and between them the interpreter cost more than the arithmetic. The Python code
runs on CUDA tensors, under tracing, and wherever the core is not built.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .._inputs import SubjectInputs, XattnInputs
from .. import _cpu_core
from . import joint
from .registry import register_backend
from .base import (
    BackendBase,
    BackwardResult,
    ForwardResult,
    SubjectBackwardResult,
    SubjectForwardResult,
    empty_subject_grads,
    empty_subject_outputs,
)
from . import gemm_attention
from .gemm_attention import GemmCpu
from .primitives import Blocked, FusedCpu
from .torch_subject_keys import _SubjectKeys
from .torch_xattn import (
    _chunks,
    _fused_cpu_attention_applies,
    _fused_cpu_forward,
    xattn_backward,
    xattn_forward,
)

Tensor = torch.Tensor

# Elements of one fp32 probability block [B, H, chunk, M]: 2**19 (2 MiB) measured fastest on a
# 2-core CPU for the SD1.5 4096-query layer (B=2, H=8, M=77: chunks of ~425 queries).
_BLOCK_ELEMENTS = 1 << 19
_MIN_CHUNK = 64
# The subject op runs in the C++ core (semfid._cpu_ops) on CPU tensors when it is built; tests
# set this to False to run the Python implementation below, which the core is a port of.
USE_CPU_CORE = True
# Layers of at most this many forward multiply-adds, B·H·N·((M + M_ref)·D + M·Dv) with every size
# rounded up to a multiple of 16, run in the core's plain loops (csrc/cpu/subject_small.cpp)
# instead of its ATen chunk loop; 0 turns them off. Measured on the 2-core CPU, forward + backward,
# interleaved, loops / chunk loop: 0.49 at 0.49 M (SDXL twin's 16-query layers), 0.58 at 0.98 M
# (SD1.5 twin's 16-query layers), 0.71 at 2.0 M (SDXL twin's 64-query layers), 1.09-1.20 at 3.9 M,
# 1.4-1.6 from 15 M on.
_SMALL_WORK = 1 << 21
# More keys than this (or joint ranges) take the joint path: blocked over the keys as well.
LONG_KEYS = 1024
# Tests set this to False to run the joint path's PyTorch online softmax on CPU tensors too.
USE_FUSED_CPU = True
# Tests set this to False to run float32 CPU tensors through PyTorch's fused kernels instead of
# semfid.backends.gemm_attention.
USE_GEMM_CPU = True


def _chunk_rows(B: int, H: int, M: int) -> int:
    return max(_MIN_CHUNK, _BLOCK_ELEMENTS // max(1, B * H * M))


def _joint(inp: Union[XattnInputs, SubjectInputs]) -> bool:
    """Whether ``inp`` runs the joint path (long keys or joint ranges, module docstring)."""
    return inp.joint_ranges or inp.num_keys > LONG_KEYS


def _kernels(q: Tensor):
    """The attention primitives of the joint path for q's device (module docstring)."""
    if q.device.type == "cpu" and USE_FUSED_CPU and not torch.compiler.is_compiling():
        return GemmCpu if USE_GEMM_CPU and gemm_attention.applies(q) else FusedCpu
    return Blocked














# BLAS writes an output with a narrow last dimension several times slower than its transpose
# (measured 5x for [256, 77] x [77, 4] on this project's 2-core CPU); from 16 columns on, the
# plain product was as fast or faster.
_NARROW = 16


def _bmm(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for [batch, n, k] x [batch, k, m]; a narrow product (m < 16 < n) is computed as
    (bᵀ · aᵀ)ᵀ and returned as that transposed view."""
    if b.shape[-1] < _NARROW < a.shape[-2]:
        return torch.bmm(b.transpose(1, 2), a.transpose(1, 2)).transpose(1, 2)
    return torch.bmm(a, b)


def _add_bmm(total: Optional[Tensor], a: Tensor, b: Tensor) -> Tensor:
    """total + a @ b, in place in the orientation :func:`_bmm` gave ``total`` (None: a @ b)."""
    if total is None:
        return _bmm(a, b)
    if total.is_contiguous():
        return total.baddbmm_(a, b)
    total.transpose(1, 2).baddbmm_(b.transpose(1, 2), a.transpose(1, 2))
    return total


def _weighted_square_sum(d: Tensor, weights: Optional[Tensor]) -> Tensor:
    """[B]: Σ over every non-batch dim of w[b, s] · d²  (d [B, (H,) c, S])."""
    sq = d.square()
    if weights is not None:
        sq.mul_(weights.view(weights.shape[0], *([1] * (d.dim() - 2)), weights.shape[1]))
    return sq.flatten(1).sum(dim=1)


def _map_grad_scale(inp: SubjectInputs, dloss: Optional[Tensor], acc: torch.dtype) -> Optional[Tensor]:
    """Factor turning diff into the map gradient scattered onto dP: 2 · dloss[b] · w[b, s] /
    (N · H_red), with H_red = H per head, and for head-mean maps a further 1/H (each head's P
    carries 1/H of the mean). [B, 1, (1,) 1] for rectangular rows (w = 1/S), [B, 1, (1,) S] ragged."""
    if dloss is None or inp.num_queries == 0:  # no queries: no chunk to scale
        return None
    S, H = inp.num_selected, inp.heads
    c = dloss.to(acc) * (2.0 / (inp.num_queries * H))  # H: H_red per head, the 1/H of a mean
    lead = (1,) if inp.mean_heads else (1, 1)
    if inp.weights is None:
        return c.mul_(1.0 / S).view(-1, *lead, 1)
    return (c[:, None] * inp.weights.to(acc)).view(c.shape[0], *lead, S)


@register_backend
class TorchBackend(BackendBase):
    """Chunked PyTorch implementation: runs anywhere, keeps only q, k, v, out and lse for backward."""

    NAME = "torch"
    SUPPORTED_DEVICES = frozenset({"cpu", "cuda"})
    SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
    PRIORITY = 100
    # The portable fallback: auto may always take it, even where faster backends are unvalidated.
    AUTO_DEVICES = frozenset({"cpu", "cuda"})

    # Its short-key subject backward recomputes P with the forward's softmax: no lse to save
    # (the joint path saves it: subject_saves_lse).
    SUBJECT_SAVES_LSE = False
    JOINT_RANGES = True

    @classmethod
    def status(cls) -> str:
        core = "in C++ (semfid._cpu_ops)" if _cpu_core.module() is not None else "in Python"
        return f"tested on CPU; the same code runs on CUDA tensors; subject op on CPU runs {core}"

    # ---- cross-attention with selected maps ---------------------------------------------------------
    @staticmethod
    def forward(inp: XattnInputs) -> ForwardResult:
        if _joint(inp):
            return joint.xattn_forward(_kernels(inp.q), inp)
        if inp.select is None and _fused_cpu_attention_applies(inp.q, inp.k, inp.v):
            return _fused_cpu_forward(inp)
        return xattn_forward(inp, _chunk_rows(inp.batch, inp.heads, inp.num_keys))

    @staticmethod
    def backward(inp: XattnInputs, out, lse, dout, dmaps) -> BackwardResult:
        if _joint(inp):
            return joint.xattn_backward(_kernels(inp.q), inp, out, lse, dout, dmaps)
        return xattn_backward(inp, out, lse, dout, dmaps,
                              _chunk_rows(inp.batch, inp.heads, inp.num_keys))

    # ---- the one-pass subject-wise loss -------------------------------------------------------------
    @classmethod
    def subject_saves_lse(cls, inp: SubjectInputs) -> bool:
        return _joint(inp)  # the joint path's maps come from lse; the short path recomputes P

    @staticmethod
    def subject_forward(inp: SubjectInputs) -> SubjectForwardResult:
        if _joint(inp):
            return joint.subject_forward(_kernels(inp.q), inp)
        core = _core_for(inp.q)
        if core is not None:
            # pybind returns a list: autograd and the op's callers want a tuple
            return tuple(core.subject_forward(*_core_inputs(inp), inp.return_maps, *_core_tuning()))
        return _subject_forward_python(inp)

    @staticmethod
    def subject_backward(inp: SubjectInputs, out, lse, lse_ref, diff, dout, dloss,
                         dmaps) -> SubjectBackwardResult:
        if _joint(inp):
            return joint.subject_backward(_kernels(inp.q), inp, out, lse, lse_ref, diff, dout,
                                          dloss, dmaps)
        core = _core_for(inp.q)
        if core is not None:
            return tuple(core.subject_backward(*_core_inputs(inp), inp.detach_reference, diff,
                                               dout, dloss, dmaps, *_core_tuning()))
        return _subject_backward_python(inp, diff, dout, dloss, dmaps)

    @classmethod
    def eager_subject(cls, inp: SubjectInputs) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
        core = _core_for(inp.q)
        # The core is these two methods in C++: a subclass that replaces either must run its own.
        own = (cls.subject_forward is TorchBackend.subject_forward
               and cls.subject_backward is TorchBackend.subject_backward)
        if core is None or not own or _joint(inp):
            return None
        return tuple(core.subject_attention(*_core_inputs(inp), inp.detach_reference,
                                            inp.return_maps, *_core_tuning()))


def _core_inputs(inp: SubjectInputs) -> tuple:
    """The leading arguments every C++ core function takes, in its order."""
    return (inp.q, inp.k, inp.v, inp.k_ref, inp.bias, inp.ref_bias, inp.tokens, inp.ref_tokens,
            inp.weights, inp.scale, inp.mean_heads)


def _core_tuning() -> tuple:
    """The chunking / orientation / small-layer constants, read at call time (tests patch them)."""
    return _BLOCK_ELEMENTS, _MIN_CHUNK, _NARROW, _SMALL_WORK


def _core_for(q: Tensor):
    """The C++ core (semfid._cpu_ops) for CPU tensors in eager mode, else None."""
    if q.device.type != "cpu" or not USE_CPU_CORE or torch.compiler.is_compiling():
        return None
    return _cpu_core.module()


# ---- the subject op in Python (the C++ core, csrc/cpu/subject_core.cpp, is a line-by-line port) ----
def _subject_forward_python(inp: SubjectInputs) -> SubjectForwardResult:
    q = inp.q
    B, H, N, _ = q.shape
    keys = _SubjectKeys(inp, paired=True)
    S = inp.num_selected
    out, lse, lse_ref, _, maps, diff = empty_subject_outputs(
        q, inp.v, inp.tokens, inp.mean_heads, inp.detach_reference, inp.return_maps,
        saves_lse=False)
    loss = None
    for rows in _chunks(N, _chunk_rows(B, H, 2 * keys.width)):
        _, p = keys.probabilities(keys.queries(q, rows, keys.scale))
        c = p.shape[1]
        out[:, :, rows] = _bmm(p[:, :, 0, :], keys.v).view(B, H, c, -1)
        a = keys.gather_maps(p, inp.mean_heads)
        # head-mean diff is saved for backward: written in place; per head it is a temporary
        d = torch.sub(a[..., :S], a[..., S:], out=diff[:, rows]) if inp.mean_heads else \
            a[..., :S] - a[..., S:]
        if inp.return_maps:
            maps[..., rows, :] = a[..., :S]
        part = _weighted_square_sum(d, inp.weights)
        loss = part if loss is None else loss.add_(part)  # chunks in order: reproducible bits
    if loss is None:  # no queries: the mean over an empty set, as torch.mean gives it
        return out, lse, lse_ref, q.new_full((B,), float("nan"), dtype=keys.acc), maps, diff
    h_red = 1 if inp.mean_heads else H
    loss.mul_(1.0 / (N * h_red * (S if inp.weights is None else 1)))
    return out, lse, lse_ref, loss, maps, diff


def _subject_backward_python(inp: SubjectInputs, diff: Tensor, dout: Optional[Tensor],
                             dloss: Optional[Tensor], dmaps: Optional[Tensor]) -> SubjectBackwardResult:
    q = inp.q
    B, H, N, D = q.shape
    dq, dk_out, dv_out, dk_ref_out = empty_subject_grads(q, inp.k, inp.v, inp.k_ref,
                                                         inp.detach_reference)
    # Head-mean maps with a detached reference need no A_r again: diff was saved.
    paired = not (inp.mean_heads and inp.detach_reference)
    keys = _SubjectKeys(inp, paired=paired)
    factor = _map_grad_scale(inp, dloss, keys.acc)
    W = keys.width
    # The key columns whose dS reaches dq and dk: the reference segment only when it is not
    # detached (a detached P_r is recomputed for the per-head diff alone).
    k_grad = W if inp.detach_reference else keys.segments * W
    keys_grad = keys.keys[:, :k_grad]
    dkeys = dv = None
    for rows in _chunks(N, _chunk_rows(B, H, keys.segments * W)):
        qc = keys.queries(q, rows, keys.scale)  # scaled: dkeys = dSᵀ·q·scale comes out whole
        _, p = keys.probabilities(qc)
        c = p.shape[1]
        p_t = p[:, :, 0, :]
        dp_t = None
        if dout is not None:
            do_c = keys.queries(dout, rows)
            dp_t = torch.bmm(do_c, keys.v.transpose(1, 2))
            dv = _add_bmm(dv, p_t.transpose(1, 2), do_c)
        if paired or dp_t is None:
            dp = p.new_zeros(p.shape)
            if dp_t is not None:
                dp[:, :, 0, :] = dp_t
        else:
            dp = dp_t.view(p.shape)
        g = _subject_map_grads(inp, keys, p, diff, factor, dmaps, rows)
        if g is not None:
            keys.scatter_map_grads(dp, g, inp.mean_heads)
        ds = torch._softmax_backward_data(dp, p, -1, keys.acc).view(B * H, c, -1)[:, :, :k_grad]
        dq_c = _bmm(ds, keys_grad).view(B, H, c, D)
        if dq.dtype == keys.acc:
            torch.mul(dq_c, keys.scale, out=dq[:, :, rows])  # out= must have the product's dtype
        else:
            dq[:, :, rows] = dq_c.mul_(keys.scale)
        dkeys = _add_bmm(dkeys, ds.transpose(1, 2), qc)
    M, M_ref = inp.k.shape[2], inp.k_ref.shape[2]
    if dkeys is None:  # no queries: nothing reaches the keys
        dkeys = q.new_zeros(B * H, keys.segments * W, D, dtype=keys.acc)
    dkeys = dkeys.view(B, H, -1, D)
    dk_out.copy_(dkeys[:, :, :M])
    if dv is None:
        dv_out.zero_()
    else:
        dv_out.copy_(dv.view(B, H, W, -1)[:, :, :M])
    if not inp.detach_reference:
        dk_ref_out.copy_(dkeys[:, :, W:W + M_ref])
    return dq, dk_out, dv_out, dk_ref_out


def _subject_map_grads(inp: SubjectInputs, keys: _SubjectKeys, p: Tensor, diff: Tensor,
                       factor: Optional[Tensor], dmaps: Optional[Tensor],
                       rows: slice) -> Optional[Tensor]:
    """Map gradients of one chunk to scatter onto dP: [B, c, segments·S] for head-mean maps
    (already divided by H) or [B, H, c, segments·S]; None when there are none.

    dA_t = factor · diff (+ dmaps); dA_r = −factor · diff when the reference is not detached.
    Per-head maps recompute diff per head from P (A_t − A_r is not stored per head)."""
    S = inp.num_selected
    if inp.mean_heads:
        d = diff[:, rows]
    else:
        a = keys.gather_maps(p, False)
        d = a[..., :S] - a[..., S:]
    g_t = None if factor is None else d * factor
    if dmaps is not None:
        dm = dmaps[..., rows, :].to(keys.acc)
        alpha = 1.0 / inp.heads if inp.mean_heads else 1.0  # factor already holds the 1/H
        g_t = dm.mul(alpha) if g_t is None else g_t.add_(dm, alpha=alpha)
    if keys.segments == 1:
        return g_t
    g_r = None if (factor is None or inp.detach_reference) else -(d * factor)
    if g_t is None and g_r is None:
        return None
    return torch.cat([torch.zeros_like(d) if g_t is None else g_t,
                      torch.zeros_like(d) if g_r is None else g_r], dim=-1)




