"""Attention with lse on CPU from whole-row matrix products: the torch backend's joint-path
primitive for float32 CPU tensors (:class:`GemmCpu`, the interface of
:mod:`semfid.backends.primitives`).

Why not PyTorch's fused CPU flash kernel: it runs its products through MKL's sgemm, which on
AMD CPUs takes its AVX2 path, and its softmax steps between small blocks. Here every (batch,
head) runs as a few large products on contiguous operands, through oneDNN's matmul
(``mkldnn::_linear_pointwise``, AVX-512 where the CPU has it; strict float32, checked once per
process against ``torch.mm``) or ``torch.mm`` where oneDNN is absent or fails the check, and the
steps between them are single passes of the C++ core's row kernels (``csrc/cpu/row_exp.cpp``).
On the 2-core AMD EPYC VM a Flux 512-px layer's forward + backward takes about 2/3 of the fused
kernel's time (``benchmarks/attn_dit.py``).

Forward, per (b, h) and block of R query rows: ``S = (q·scale) kᵀ`` [R, M] (all keys: no online
softmax), ``P~ = exp(S + bias − rowmax)`` in place, ``out = (P~ v) / rowsum``, lse.
Backward, per (b, h) and block of C keys, in the transposed orientation so that every product
reads contiguous rows: ``Pᵀ = exp(k (q·scale)ᵀ + bias − lse)`` [C, N], ``dv = Pᵀ dO``,
``dSᵀ = Pᵀ ⊙ (v dOᵀ − δ)``, ``dk = dSᵀ (q·scale)``, ``dq += dS k`` (δ = rowsum(dO ⊙ out) + extra).

Temporaries: one [R, M] or [C, N] float32 block of at most ``BLOCK_ELEMENTS`` elements (4 MiB)
and a second one in backward, plus per (b, h) contiguous copies of q, k, v, dO ([N | M, D | W]).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from .. import _cpu_core

Tensor = torch.Tensor
Grads = Tuple[Tensor, Tensor, Tensor]

#: Elements of one logit block (float32: 4 MiB); rows per block a multiple of 16, at least 16.
BLOCK_ELEMENTS = 1 << 20
#: Smallest head dim taken. Fused kernel / this, forward + backward, 2-core AMD EPYC VM: head dim
#: 16 (B·H = 4, 768 tokens) 0.65, 32 (B·H = 4 and 8) 0.87-0.91, 64 (24 heads, 512-1100 tokens)
#: 1.27-1.33, 72 (16 heads) 1.43, 128 (24 heads) 1.39: thin products do not pay for the copies.
MIN_HEAD_DIM = 48
ENV_VAR = "SEMFID_ONEDNN"

_onednn_reason: Optional[str] = None
_onednn_checked = False


def _rows_per_block(width: int) -> int:
    rows = max(16, BLOCK_ELEMENTS // max(1, width))
    return rows - rows % 16


def _onednn_linear(x: Tensor, w: Tensor) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def onednn_reason() -> Optional[str]:
    """None when oneDNN's matmul computes ``x wᵀ`` here (checked once against ``torch.mm`` in
    float64 on an odd-sized problem); else why :func:`linear_nt` uses ``torch.mm``."""
    global _onednn_reason, _onednn_checked
    if not _onednn_checked:
        _onednn_checked = True
        if os.environ.get(ENV_VAR, "1").strip() == "0":
            _onednn_reason = f"disabled by {ENV_VAR}=0"
        elif not (torch.backends.mkldnn.is_available()
                  and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
            _onednn_reason = "this torch has no oneDNN matmul (mkldnn::_linear_pointwise)"
        else:
            gen = torch.Generator().manual_seed(7)
            x, w = torch.randn(37, 29, generator=gen), torch.randn(53, 29, generator=gen)
            try:
                got = _onednn_linear(x, w).double()
            except Exception as exc:  # noqa: BLE001 - any failure means "use torch.mm"
                _onednn_reason = f"oneDNN matmul failed ({type(exc).__name__}: {exc})"
            else:
                want = x.double() @ w.double().t()
                err = float((got - want).abs().max()) if got.shape == want.shape else float("inf")
                if not err <= 1e-5 * float(want.abs().max()):
                    _onednn_reason = f"oneDNN matmul is off by {err:.1e} from float64 (not strict float32)"
    return _onednn_reason


def linear_nt(x: Tensor, w: Tensor) -> Tensor:
    """``x wᵀ`` [R, C] for float32 x [R, D] and w [C, D] (copied when not contiguous: oneDNN's
    strided path is orders of magnitude slower)."""
    x, w = x.contiguous(), w.contiguous()
    if onednn_reason() is None:
        return _onednn_linear(x, w)
    return torch.mm(x, w.t())


def applies(q: Tensor) -> bool:
    """Whether :class:`GemmCpu` takes these tensors: float32 on CPU, head dim at least
    ``MIN_HEAD_DIM``, in eager mode, with the C++ core's row kernels loaded."""
    core = _cpu_core.module()
    return (q.device.type == "cpu" and q.dtype == torch.float32 and q.shape[-1] >= MIN_HEAD_DIM
            and core is not None and hasattr(core, "softmax_rows_")
            and not torch.compiler.is_compiling())


def _empty_keys(q: Tensor, width: int) -> Tuple[Tensor, Tensor]:
    B, H, N, _ = q.shape
    return q.new_zeros(B, H, N, width), q.new_full((B, H, N), float("inf"))


class GemmCpu:
    """The primitives of :mod:`semfid.backends.primitives` from whole-row products (module
    docstring): float32 CPU tensors only (:func:`applies`)."""

    @staticmethod
    def attend(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float
               ) -> Tuple[Tensor, Tensor]:
        B, H, N, _ = q.shape
        M, W = k.shape[2], v.shape[-1]
        if M == 0 or N == 0:
            return _empty_keys(q, W)
        core = _cpu_core.module()
        out = q.new_empty(B, H, N, W)
        lse = q.new_empty(B, H, N)
        rows = _rows_per_block(M)
        for b in range(B):
            for h in range(H):
                qs = (q[b, h] * scale).contiguous()
                kh, vt = k[b, h].contiguous(), v[b, h].t().contiguous()
                bh = None if bias is None else bias[b, h].contiguous()
                for r0 in range(0, N, rows):
                    s = linear_nt(qs[r0:r0 + rows], kh)
                    lse_r, inv_sum = core.softmax_rows_(s, bh)
                    out[b, h, r0:r0 + rows] = linear_nt(s, vt).mul_(inv_sum[:, None])
                    lse[b, h, r0:r0 + rows] = lse_r
        return out, lse

    @staticmethod
    def attend_backward(q: Tensor, k: Tensor, vv: Tensor, bias: Optional[Tensor], scale: float,
                        out: Tensor, lse: Tensor, dout: Tensor) -> Grads:
        return GemmCpu.attend_backward_delta(q, k, vv, bias, scale, out, lse, dout, None)

    @staticmethod
    def attend_backward_delta(q: Tensor, k: Tensor, vv: Tensor, bias: Optional[Tensor],
                              scale: float, out: Tensor, lse: Tensor, dout: Tensor,
                              extra: Optional[Tensor]) -> Grads:
        B, H, N, D = q.shape
        M, W = k.shape[2], vv.shape[-1]
        dq = q.new_zeros(B, H, N, D)
        if M == 0 or N == 0:
            return dq, k.new_zeros(B, H, M, D), vv.new_zeros(B, H, M, W, dtype=q.dtype)
        core = _cpu_core.module()
        dk = q.new_empty(B, H, M, D)
        dvv = q.new_empty(B, H, M, W)
        dout = dout.to(q.dtype)
        delta = (dout * out.to(q.dtype)).sum(dim=-1)  # rowsum(dO ⊙ out) = rowsum(P ⊙ dP)
        if extra is not None:
            delta += extra.to(q.dtype)
        lse = lse.to(q.dtype)
        cols = _rows_per_block(N)
        for b in range(B):
            for h in range(H):
                qs = (q[b, h] * scale).contiguous()
                qs_t = qs.t().contiguous()
                do = dout[b, h].contiguous()
                do_t = do.t().contiguous()
                lse_h, delta_h = lse[b, h].contiguous(), delta[b, h].contiguous()
                dq_h = dq[b, h]
                for c0 in range(0, M, cols):
                    kc = k[b, h, c0:c0 + cols].contiguous()
                    vc = vv[b, h, c0:c0 + cols].to(q.dtype).contiguous()
                    bc = None if bias is None else bias[b, h, c0:c0 + cols].contiguous()
                    p_t = linear_nt(kc, qs)  # logits, transposed [C, N]
                    core.exp_rows_cols_(p_t, bc, lse_h)
                    dvv[b, h, c0:c0 + cols] = linear_nt(p_t, do_t)
                    ds_t = linear_nt(vc, do)  # dPᵀ
                    core.softmax_grad_cols_(ds_t, p_t, delta_h)
                    dk[b, h, c0:c0 + cols] = linear_nt(ds_t, qs_t)
                    dq_h.addmm_(ds_t.t(), kc)
        return dq.mul_(scale), dk, dvv


__all__ = ["GemmCpu", "applies", "linear_nt", "onednn_reason", "BLOCK_ELEMENTS"]
