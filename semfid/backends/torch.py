"""The portable, memory-efficient PyTorch backend (CPU and CUDA, every dtype).

Forward and backward walk the queries in chunks, so the largest temporary is one
[B, H, chunk, M] block of probabilities (≈2 MiB) and nothing of size [B, H, N, M] is ever kept:
backward recomputes P from q and k. Chunks are computed in float32 (float64 for float64 inputs),
so half-precision inputs get fp32 softmax and accumulation.

Backward per chunk (P recomputed, G = map gradient scattered onto the selected columns)::

    dP = dO · Vᵀ + scatter(G)
    dS = P ⊙ (dP − rowsum(P ⊙ dP))                       (softmax backward, one fused op)
    dQ = dS · K · scale,   dK += dSᵀ · Q · scale,   dV += Pᵀ · dO

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

from typing import Iterator, Optional, Tuple

import torch

from .._inputs import SubjectInputs, XattnInputs, accumulation_dtype
from .. import _cpu_core
from . import register_backend
from .base import (
    BackendBase,
    BackwardResult,
    ForwardResult,
    SubjectBackwardResult,
    SubjectForwardResult,
    empty_forward_outputs,
    empty_output,
    empty_subject_grads,
    empty_subject_outputs,
    nan_rows,
    nothing,
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


def _chunks(n: int, rows_per_chunk: int) -> Iterator[slice]:
    """Query rows in round(n / rows_per_chunk) chunks (at least one) of equal size up to one row:
    the block budget is a target, so a 256-query layer is one chunk of 256, not 212 + 44 (the
    second chunk cost as many calls as the first). The C++ core splits the same way."""
    count = max(1, (n + rows_per_chunk // 2) // rows_per_chunk)
    size = max(1, -(-n // count))  # n = 0: no chunk
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _chunk_rows(B: int, H: int, M: int) -> int:
    return max(_MIN_CHUNK, _BLOCK_ELEMENTS // max(1, B * H * M))


def _map_index(select: Tensor, H: int, rows: int) -> Tensor:
    """[B, S] -> [B, H, rows, S] view used to gather/scatter the selected columns."""
    B, S = select.shape
    return select[:, None, None, :].expand(B, H, rows, S)


def _dead_rows(bias: Tensor) -> Tensor:
    """[B, H, 1] mask of the (batch, head) pairs whose keys are all -inf (P = 0, lse = +inf)."""
    return torch.isneginf(bias).all(dim=-1)[:, :, None]


def _dead_mask_or_none(dead: Tensor, bias: Tensor) -> Optional[Tensor]:
    """``dead`` when it may hold a True (always on CUDA / under tracing: no host sync), else None."""
    if torch.compiler.is_compiling() or bias.device.type != "cpu" or bool(dead.any()):
        return dead
    return None


def _row_lse(s: Tensor, p: Tensor) -> Tensor:
    """lse = max logit − log(max probability): both maxima sit on the same key and p_max ≥ 1/M,
    so the log is exact to float rounding (no separate logsumexp pass)."""
    return s.amax(dim=-1).sub_(p.amax(dim=-1).log_())


class _Operands:
    """The per-call tensors both passes share, in the accumulation dtype.

    ``k_t_scaled`` is kᵀ·scale [B, H, D, M] (scale folded in once), ``k_scaled`` its transpose for
    dQ = dS·K·scale; ``dead_rows`` [B, H, 1, 1] marks (batch, head) pairs whose keys are all -inf
    (None when there are none): softmax would give NaN there, the contract says P = 0.
    """

    def __init__(self, k, v, bias, scale):
        self.acc = accumulation_dtype(k.dtype)
        self.k_scaled = k.to(self.acc) * scale
        self.k_t_scaled = self.k_scaled.transpose(-1, -2)
        self.v = None if v is None else v.to(self.acc)
        self.bias = None if bias is None else bias[:, :, None, :]
        self.dead_rows = None if bias is None else _dead_mask_or_none(_dead_rows(bias)[..., None], bias)

    def logits(self, qc: Tensor) -> Tensor:
        """[B, H, c, M] logits q·kᵀ·scale + bias."""
        s = torch.matmul(qc.to(self.acc), self.k_t_scaled)
        return s.add_(self.bias) if self.bias is not None else s

    def softmax(self, s: Tensor) -> Tensor:
        """P = softmax(s) over the keys, 0 on fully masked rows."""
        p = torch.softmax(s, dim=-1)
        return p.masked_fill_(self.dead_rows, 0.0) if self.dead_rows is not None else p

    def probabilities(self, qc: Tensor) -> Tensor:
        """P of a query chunk [B, H, c, M].

        Backward recomputes P with the forward's own fused softmax rather than as exp(logit − lse):
        as cheap (one pass), and bit-identical to the forward, whereas an fp32 lse of a row padded
        with −10000 is only good to ~5e-4 and would make P that much off.
        """
        return self.softmax(self.logits(qc))


class _SubjectKeys:
    """Keys of the subject op as [B·H, K, D] batches (3-D ``bmm``/``baddbmm``: no per-call
    reshapes, the bias folded into the logits matmul; the scale goes into the query chunk).

    ``paired=True``: the target and reference keys as one set of K = 2·M' keys (see module
    docstring); probabilities are viewed as [B·H, c, 2, M'], index 0 of dim -2 being the target.
    ``paired=False``: the target keys alone (K = M), for the backward that needs no A_r.
    """

    def __init__(self, inp: SubjectInputs, paired: bool):
        acc = self.acc = accumulation_dtype(inp.dtype)
        B, H, M, D = inp.k.shape
        M_ref = inp.k_ref.shape[2]
        self.B, self.H, self.M, self.M_ref = B, H, M, M_ref
        self.scale = inp.scale
        self.width = width = max(M, M_ref) if paired else M
        self.segments = 2 if paired else 1
        if not paired:
            keys = inp.k.to(acc)
        elif M == M_ref:
            keys = torch.cat([inp.k, inp.k_ref], dim=2).to(acc)  # a fresh contiguous tensor
        else:
            keys = inp.q.new_zeros(B, H, 2 * width, D, dtype=acc)
            keys[:, :, :M] = inp.k
            keys[:, :, width:width + M_ref] = inp.k_ref
        self.keys = keys.reshape(B * H, -1, D)  # a copy only for a strided (diffusers) k
        self.keys_t = self.keys.transpose(1, 2)
        v = inp.v.to(acc)
        if width != M:  # the target segment is M' wide: zero value rows under its padding keys
            v = torch.nn.functional.pad(v, (0, 0, 0, width - M))
        self.v = v.reshape(B * H, width, -1)
        self.bias = self._bias(inp, paired)
        self.dead_rows = None
        if self.bias is not None:
            dead = torch.isneginf(self.bias.view(B * H, 1, self.segments, width)).all(dim=-1)
            self.dead_rows = _dead_mask_or_none(dead[..., None], self.bias)
        if paired:
            self.index = torch.cat([inp.tokens, inp.ref_tokens + width], dim=1)
        else:
            self.index = inp.tokens

    def _bias(self, inp: SubjectInputs, paired: bool) -> Optional[Tensor]:
        """[B·H, 1, K] logit bias (None when no key is biased or padded)."""
        B, H, M, M_ref, W = self.B, self.H, self.M, self.M_ref, self.width
        if not paired:
            return None if inp.bias is None else inp.bias.reshape(B * H, 1, M).to(self.acc)
        if inp.bias is None and inp.ref_bias is None and M == M_ref:
            return None
        bias = inp.q.new_zeros(B, H, 2 * W, dtype=self.acc)
        bias[:, :, M:W] = float("-inf")
        bias[:, :, W + M_ref:] = float("-inf")
        if inp.bias is not None:
            bias[:, :, :M] = inp.bias
        if inp.ref_bias is not None:
            bias[:, :, W:W + M_ref] = inp.ref_bias
        return bias.view(B * H, 1, 2 * W)

    def queries(self, t: Tensor, rows: slice, scale: Optional[float] = None) -> Tensor:
        """[B·H, c, D] contiguous chunk of a [B, H, N, D] tensor (q or dout) in the acc dtype,
        times ``scale`` when given (the logit scale is folded into the query chunk)."""
        chunk = t[:, :, rows]
        B, H, c = self.B, self.H, chunk.shape[2]
        out = torch.empty((B, H, c, chunk.shape[3]), dtype=self.acc, device=t.device)
        if scale is None:
            out.copy_(chunk)
        elif t.dtype == self.acc:
            torch.mul(chunk, scale, out=out)  # one pass: gather the strided rows and scale them
        else:
            out.copy_(chunk).mul_(scale)  # widen first: the product is formed in the acc dtype
        return out.view(B * H, c, -1)

    def probabilities(self, qc: Tensor) -> Tuple[Tensor, Tensor]:
        """(logits, P) of a query chunk, both [B·H, c, segments, M']."""
        if self.bias is not None:
            s = torch.baddbmm(self.bias, qc, self.keys_t)
        else:
            s = torch.bmm(qc, self.keys_t)
        s = s.view(s.shape[0], s.shape[1], self.segments, self.width)
        p = torch.softmax(s, dim=-1)
        if self.dead_rows is not None:
            p.masked_fill_(self.dead_rows, 0.0)
        return s, p

    def gather_maps(self, p: Tensor, mean_heads: bool) -> Tensor:
        """[B, (H,) c, segments·S] selected columns (A_t first, then A_r when paired)."""
        B, H = self.B, self.H
        c = p.shape[1]
        flat = p.view(B, H, c, self.segments * self.width)
        a = torch.gather(flat, -1, _map_index(self.index, H, c))
        return a.mean(dim=1) if mean_heads else a

    def scatter_map_grads(self, dp: Tensor, g: Tensor, mean_heads: bool) -> None:
        """dP[..., index] += G: g [B, c, segments·S] (already divided by H) or [B, H, c, ..]."""
        B, H = self.B, self.H
        c = dp.shape[1]
        if mean_heads:
            g = g.unsqueeze(1).expand(B, H, c, g.shape[-1])
        dp.view(B, H, c, -1).scatter_add_(-1, _map_index(self.index, H, c), g)


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

    # Its subject backward recomputes P with the forward's softmax: no lse to save.
    SUBJECT_SAVES_LSE = False

    @classmethod
    def status(cls) -> str:
        core = "in C++ (semfid._cpu_ops)" if _cpu_core.module() is not None else "in Python"
        return f"tested on CPU; the same code runs on CUDA tensors; subject op on CPU runs {core}"

    # ---- cross-attention with selected maps ---------------------------------------------------------
    @staticmethod
    def forward(inp: XattnInputs) -> ForwardResult:
        q, k, v, bias, select = inp.q, inp.k, inp.v, inp.bias, inp.select
        B, H, N, _ = q.shape
        if select is None and _fused_cpu_attention_applies(q, k, v):
            return _fused_cpu_forward(inp)
        ops = _Operands(k, v, bias, inp.scale)
        out, lse, maps = empty_forward_outputs(q, k, v, select, inp.mean_heads)
        for rows in _chunks(N, _chunk_rows(B, H, k.shape[2])):
            s = ops.logits(q[:, :, rows])
            p = ops.softmax(s)
            row_lse = _row_lse(s, p)
            if ops.dead_rows is not None:
                row_lse = row_lse.masked_fill_(ops.dead_rows[..., 0], float("inf"))
            lse[:, :, rows] = row_lse
            if ops.v is not None:
                out[:, :, rows] = torch.matmul(p, ops.v)
            if select is not None:
                picked = torch.gather(p, -1, _map_index(select, H, p.shape[2]))
                maps[..., rows, :] = picked.mean(dim=1) if inp.mean_heads else picked
        return out, lse, maps

    @staticmethod
    def backward(inp: XattnInputs, out, lse, dout, dmaps) -> BackwardResult:
        q, k, v, select = inp.q, inp.k, inp.v, inp.select
        B, H, N, _ = q.shape
        ops = _Operands(k, v, inp.bias, inp.scale)
        has_dout = v is not None and dout is not None
        has_dmaps = select is not None and dmaps is not None

        dq = torch.empty_like(q)
        dk = torch.zeros(k.shape, dtype=ops.acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=ops.acc, device=q.device) if v is not None else None

        for rows in _chunks(N, _chunk_rows(B, H, k.shape[2])):
            qc = q[:, :, rows].to(ops.acc)
            p = ops.probabilities(qc)
            if has_dout:
                do_c = dout[:, :, rows].to(ops.acc)
                dp = torch.matmul(do_c, ops.v.transpose(-1, -2))
                dv.add_(torch.matmul(p.transpose(-1, -2), do_c))
            else:
                dp = torch.zeros_like(p)
            if has_dmaps:
                g = dmaps[..., rows, :].to(ops.acc)
                g = (g / H).unsqueeze(1).expand(B, H, -1, -1) if inp.mean_heads else g
                dp.scatter_add_(-1, _map_index(select, H, p.shape[2]), g)
            # dS = P ⊙ (dP − rowsum(P ⊙ dP)), fused.
            ds = torch._softmax_backward_data(dp, p, -1, ops.acc)
            dq[:, :, rows] = torch.matmul(ds, ops.k_scaled)
            dk.add_(torch.matmul(ds.transpose(-1, -2), qc))
        dv_out = torch.empty_like(v).copy_(dv) if dv is not None else q.new_empty(0)
        return dq, torch.empty_like(k).copy_(dk.mul_(inp.scale)), dv_out

    # ---- the one-pass subject-wise loss -------------------------------------------------------------
    @staticmethod
    def subject_forward(inp: SubjectInputs) -> SubjectForwardResult:
        core = _core_for(inp.q)
        if core is not None:
            # pybind returns a list: autograd and the op's callers want a tuple
            return tuple(core.subject_forward(*_core_inputs(inp), inp.return_maps, *_core_tuning()))
        return _subject_forward_python(inp)

    @staticmethod
    def subject_backward(inp: SubjectInputs, out, lse, lse_ref, diff, dout, dloss,
                         dmaps) -> SubjectBackwardResult:
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
        if core is None or not own:
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


def _fused_cpu_attention_applies(q, k, v) -> bool:
    """PyTorch's fused CPU attention kernel returns (out, lse) for equal q/v head dims."""
    return (q.device.type == "cpu" and v is not None and v.shape[-1] == q.shape[-1]
            and q.shape[2] > 0 and not torch.compiler.is_compiling())


def _fused_cpu_forward(inp: XattnInputs) -> ForwardResult:
    """Output-only forward through ``aten._scaled_dot_product_flash_attention_for_cpu``.

    With no maps to write, PyTorch's own fused kernel (blocked, fp32 accumulation, all threads)
    computes out and the natural-log lse faster than the chunk loop; rows whose keys are all -inf
    come back as zeros with lse 0, which the contract turns into +inf. Its outputs are put into the
    contract's layouts when they differ (the kernel follows q's layout).
    """
    q, bias = inp.q, inp.bias
    mask = None if bias is None else bias[:, :, None, :].to(q.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, inp.k, inp.v, attn_mask=mask, scale=inp.scale)[:2]
    if bias is not None:
        lse = lse.masked_fill(_dead_rows(bias), float("inf"))
    bad = nan_rows(q, inp.k)  # the kernel zeroes NaN rows; the contract propagates NaN
    out = out.masked_fill(bad, float("nan"))
    lse = lse.masked_fill(bad[..., 0], float("nan"))
    layout = empty_output(q, inp.v)
    if out.stride() != layout.stride():
        out = layout.copy_(out)
    lse = lse.to(accumulation_dtype(q.dtype)).contiguous()
    return out, lse, nothing(q)
