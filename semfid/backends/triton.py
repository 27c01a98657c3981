"""Adapter to the Triton kernels in ``semfid.kernels`` (imported lazily: ``import semfid`` never
needs triton).

Runs CUDA tensors, and CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was imported
(the interpreter: slow, for tests). ``"auto"`` does not pick it yet: the kernels compile for
sm_80/sm_90 (``python -m semfid.info --compile-check``) but their tests have not run on a GPU.
Once ``tests/test_triton_gpu.py`` passes on real hardware, set ``AUTO_DEVICES = {"cuda"}``.
"""

from __future__ import annotations

import os
from typing import List, Optional, Union

import torch

from .._inputs import SubjectInputs, XattnInputs
from . import register_backend
from .base import BackendBase, BackwardResult, ForwardResult, SubjectBackwardResult, SubjectForwardResult

_UNSET = object()
_import_error: object = _UNSET


def _kernels():
    """The ``semfid.kernels`` module (imports triton on first use)."""
    from .. import kernels  # noqa: F401  (semfid.kernels, installed from the top-level kernels/)

    return kernels


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _as_unit_stride(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Copy a small k/v-sized tensor whose last dim is strided (keeps loads vectorised).
    q, out and the gradients are never copied: the kernels take any strides."""
    if t is None or t.stride(-1) == 1 or t.dim() == 0:
        return t
    return t.contiguous()


@register_backend
class TritonBackend(BackendBase):
    """Fused Triton kernels: one pass per query block, all keys (<= 256) of a head on chip."""

    NAME = "triton"
    SUPPORTED_DEVICES = frozenset({"cuda", "cpu"}) if _interpreting() else frozenset({"cuda"})
    SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
    MAX_HEAD_DIM = 256
    MAX_KEYS = 256
    PRIORITY = 10
    # Not validated on a GPU yet: "auto" must not pick it (see module docstring).
    AUTO_DEVICES = frozenset()
    SELF_VALIDATED = True  # auto takes it on a GPU where semfid.selftest passed

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        global _import_error
        if _import_error is _UNSET:
            try:
                import triton  # noqa: F401

                _kernels()
                _import_error = None
            except Exception as e:  # ImportError, or a broken triton install
                _import_error = (
                    f"triton kernels unavailable ({type(e).__name__}: {e}); "
                    "install with `pip install triton`"
                )
        return _import_error  # type: ignore[return-value]

    @classmethod
    def status(cls) -> str:
        if cls.AUTO_DEVICES:
            return "validated on " + ", ".join(sorted(cls.AUTO_DEVICES))
        return "opt-in: compiled for sm_80/sm_90, not yet validated on a GPU"

    @classmethod
    def not_supported_reasons(cls, inp: Union[XattnInputs, SubjectInputs]) -> List[str]:
        reasons = super().not_supported_reasons(inp)
        if inp.device.type == "cpu" and "cpu" not in cls.SUPPORTED_DEVICES:
            reasons.append("CPU tensors need TRITON_INTERPRET=1 set before triton is imported")
        if isinstance(inp, SubjectInputs) and not inp.mean_heads and inp.device.type != "cpu":
            # Compiled for a GPU, the per-head subject backward holds A_t, A_r and both P / dS
            # tiles at once and spills registers on sm_80 / sm_90 at every tile the compile check
            # tried (16-32 rows, 4-16 warps); the interpreter runs it (and tests it) on CPU.
            reasons.append("head_reduce='none' subject maps: the per-head backward kernel spills "
                           "registers on sm_80/sm_90 (python -m semfid.info --compile-check)")
        return reasons

    @staticmethod
    def forward(inp: XattnInputs) -> ForwardResult:
        return _kernels().xattn_fwd(
            inp.q, _as_unit_stride(inp.k), _as_unit_stride(inp.v), inp.bias, inp.select, inp.scale,
            inp.mean_heads,
        )

    @staticmethod
    def backward(inp: XattnInputs, out, lse, dout, dmaps) -> BackwardResult:
        return _kernels().xattn_bwd(
            inp.q, inp.k, inp.v, inp.bias, inp.select, inp.scale, inp.mean_heads, out, lse, dout, dmaps,
        )

    @staticmethod
    def subject_forward(inp: SubjectInputs) -> SubjectForwardResult:
        return _kernels().subject_fwd(
            inp.q, inp.k, inp.v, inp.k_ref, inp.bias, inp.ref_bias, inp.tokens, inp.ref_tokens,
            inp.weights, inp.scale, inp.mean_heads, inp.detach_reference, inp.return_maps,
        )

    @staticmethod
    def subject_backward(inp: SubjectInputs, out, lse, lse_ref, diff, dout, dloss,
                         dmaps) -> SubjectBackwardResult:
        return _kernels().subject_bwd(
            inp.q, inp.k, inp.v, inp.k_ref, inp.bias, inp.ref_bias, inp.tokens, inp.ref_tokens,
            inp.weights, inp.scale, inp.mean_heads, inp.detach_reference, out, lse, lse_ref, diff,
            dout, dloss, dmaps,
        )
