"""Adapter to the Triton kernels in ``semfid.kernels`` (imported lazily: ``import semfid`` never
needs triton).

Runs CUDA tensors, and CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was imported
(the interpreter: slow, for tests). Two kernel families: the one-pass kernels hold all keys of a head
on chip (<= 256 keys, the UNet's 77 text tokens); the key-blocked kernels (``semfid.kernels.joint_*``,
online softmax, head dims <= 128) run everything else: more keys (joint [image, text] key sets),
``map_queries`` and ``ref_segment`` other than the full ranges. ``"auto"`` does not pick it yet: the kernels compile for
sm_80/sm_90 (``python -m semfid.info --compile-check``) but their tests have not run on a GPU.
Once ``tests/test_triton_gpu.py`` passes on real hardware, set ``AUTO_DEVICES = {"cuda"}``.
"""

from __future__ import annotations

import os
from typing import List, Optional, Union

import torch

from .._inputs import SubjectInputs, XattnInputs
from .registry import register_backend
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


#: Keys the one-pass kernels hold on chip (``semfid.kernels._utils.MAX_KEYS``; not imported here:
#: that would import triton) and head dims of the key-blocked kernels (``_joint.JOINT_MAX_HEAD_DIM``).
ONE_PASS_MAX_KEYS = 256
JOINT_MAX_HEAD_DIM = 128
#: Most tokens of the subject op on the key-blocked kernels (semfid.kernels.compile_joint gates up to it).
JOINT_SUBJECT_MAX_TOKENS = 32


def _key_blocked(inp: Union[XattnInputs, SubjectInputs]) -> bool:
    """Whether ``inp`` runs the key-blocked kernels: more keys than the one-pass kernels hold
    (the reference sequence counts for the subject op), or non-default query / key ranges."""
    return inp.num_keys > ONE_PASS_MAX_KEYS or inp.joint_ranges


def _ranges(inp: SubjectInputs):
    return inp.map_start, inp.map_stop, inp.seg_start, inp.seg_stop


@register_backend
class TritonBackend(BackendBase):
    """Fused Triton kernels: all keys (<= 256) of a head on chip, or key-blocked (any M)."""

    NAME = "triton"
    SUPPORTED_DEVICES = frozenset({"cuda", "cpu"}) if _interpreting() else frozenset({"cuda"})
    SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
    MAX_HEAD_DIM = 256
    JOINT_RANGES = True
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
        return "opt-in: compiled for sm_80/sm_90; GPU tests run on one H200 (README: Performance, GPU), no verdict shipped"

    @classmethod
    def not_supported_reasons(cls, inp: Union[XattnInputs, SubjectInputs]) -> List[str]:
        reasons = super().not_supported_reasons(inp)
        if inp.device.type == "cpu" and "cpu" not in cls.SUPPORTED_DEVICES:
            reasons.append("CPU tensors need TRITON_INTERPRET=1 set before triton is imported")
        if _key_blocked(inp):
            for label, dim in (("head_dim", inp.head_dim), ("value_dim", inp.value_dim)):
                if dim > JOINT_MAX_HEAD_DIM:
                    reasons.append(f"{label}={dim} > {JOINT_MAX_HEAD_DIM} with num_keys > {ONE_PASS_MAX_KEYS} "
                                   "or map_queries / ref_segment (the key-blocked kernels)")
            if isinstance(inp, SubjectInputs) and inp.num_selected > JOINT_SUBJECT_MAX_TOKENS:
                # The compile check measured 8-24 B register spills in the subject backward at
                # S = 77 (sm_90, head dims 64 / 72); what spills is refused, not run slowly.
                reasons.append(f"num_selected={inp.num_selected} > {JOINT_SUBJECT_MAX_TOKENS} tokens for the "
                               "subject op on the key-blocked kernels (its backward spills registers)")
            return reasons
        if isinstance(inp, SubjectInputs) and not inp.mean_heads and inp.device.type != "cpu":
            # Compiled for a GPU, the per-head subject backward holds A_t, A_r and both P / dS
            # tiles at once and spills registers on sm_80 / sm_90 at every tile the compile check
            # tried (16-32 rows, 4-16 warps); the interpreter runs it (and tests it) on CPU.
            reasons.append("head_reduce='none' subject maps: the per-head backward kernel spills "
                           "registers on sm_80/sm_90 (python -m semfid.info --compile-check)")
        return reasons

    @staticmethod
    def forward(inp: XattnInputs) -> ForwardResult:
        if _key_blocked(inp):
            return _kernels().joint_xattn_fwd(
                inp.q, _as_unit_stride(inp.k), _as_unit_stride(inp.v), inp.bias, inp.select, inp.scale,
                inp.mean_heads, inp.map_start, inp.map_stop,
            )
        return _kernels().xattn_fwd(
            inp.q, _as_unit_stride(inp.k), _as_unit_stride(inp.v), inp.bias, inp.select, inp.scale,
            inp.mean_heads,
        )

    @staticmethod
    def backward(inp: XattnInputs, out, lse, dout, dmaps) -> BackwardResult:
        if _key_blocked(inp):
            return _kernels().joint_xattn_bwd(
                inp.q, inp.k, inp.v, inp.bias, inp.select, inp.scale, inp.mean_heads, inp.map_start,
                inp.map_stop, out, lse, dout, dmaps,
            )
        return _kernels().xattn_bwd(
            inp.q, inp.k, inp.v, inp.bias, inp.select, inp.scale, inp.mean_heads, out, lse, dout, dmaps,
        )

    @staticmethod
    def subject_forward(inp: SubjectInputs) -> SubjectForwardResult:
        if _key_blocked(inp):
            return _kernels().joint_subject_fwd(
                inp.q, _as_unit_stride(inp.k), _as_unit_stride(inp.v), _as_unit_stride(inp.k_ref), inp.bias,
                inp.ref_bias, inp.tokens, inp.ref_tokens, inp.weights, inp.scale, inp.mean_heads,
                inp.detach_reference, inp.return_maps, *_ranges(inp),
            )
        return _kernels().subject_fwd(
            inp.q, inp.k, inp.v, inp.k_ref, inp.bias, inp.ref_bias, inp.tokens, inp.ref_tokens,
            inp.weights, inp.scale, inp.mean_heads, inp.detach_reference, inp.return_maps,
        )

    @staticmethod
    def subject_backward(inp: SubjectInputs, out, lse, lse_ref, diff, dout, dloss,
                         dmaps) -> SubjectBackwardResult:
        if _key_blocked(inp):
            return _kernels().joint_subject_bwd(
                inp.q, inp.k, inp.v, inp.k_ref, inp.bias, inp.ref_bias, inp.tokens, inp.ref_tokens,
                inp.weights, inp.scale, inp.mean_heads, inp.detach_reference, *_ranges(inp), out, lse,
                lse_ref, diff, dout, dloss, dmaps,
            )
        return _kernels().subject_bwd(
            inp.q, inp.k, inp.v, inp.k_ref, inp.bias, inp.ref_bias, inp.tokens, inp.ref_tokens,
            inp.weights, inp.scale, inp.mean_heads, inp.detach_reference, out, lse, lse_ref, diff,
            dout, dloss, dmaps,
        )
