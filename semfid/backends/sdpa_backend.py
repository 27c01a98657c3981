"""The ``sdpa`` backend: the forward of :mod:`semfid.backends.sdpa` (UNet-sized key sets: one
augmented-value SDPA call per key set) and, for long or joint key sets, :mod:`semfid.backends.joint`
on PyTorch's fused attention calls (:class:`~semfid.backends.primitives.SdpaFused`: the split lse,
the reference at the price of its own keys). Every backward is :mod:`semfid.backends.joint`'s
augmented-value backward on PyTorch's fused backward kernel fed the saved out and lse
(:mod:`semfid.backends.sdpa_backward`; the forward is recomputed only on CUDA where the kernel
failed its self-check).
"""

from __future__ import annotations

import torch

from .._inputs import SubjectInputs, XattnInputs
from . import joint
from .registry import register_backend
from .base import BackendBase
from .primitives import SdpaFused
from .sdpa import subject_forward, xattn_forward

# More keys than this (or joint ranges): the subject op through the split lse of
# semfid.backends.joint (the reference at the price of its own keys), not two full SDPA calls.
LONG_KEYS = 1024


@register_backend
class SdpaBackend(BackendBase):
    """PyTorch's fused SDPA kernels with the augmented-value identity: validated by PyTorch on
    every device it supports, so ``auto`` takes it on CUDA when no semfid kernel is validated."""

    NAME = "sdpa"
    SUPPORTED_DEVICES = frozenset({"cpu", "cuda"})
    SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
    # Between the semfid kernels (triton 10, cuda 20) and the chunked torch loop (100).
    PRIORITY = 50
    # On CPU the chunked torch backend is faster (DESIGN.md §5): auto takes sdpa on CUDA only.
    AUTO_DEVICES = frozenset({"cuda"})
    JOINT_RANGES = True

    @classmethod
    def status(cls) -> str:
        return "PyTorch's own fused SDPA kernels (augmented values); auto on CUDA"

    @staticmethod
    def forward(inp: XattnInputs):
        if inp.joint_ranges:
            return joint.xattn_forward(SdpaFused, inp)
        return xattn_forward(inp.q, inp.k, inp.v, inp.bias, inp.select, inp.scale, inp.mean_heads)

    @staticmethod
    def backward(inp: XattnInputs, out, lse, dout, dmaps):
        return joint.xattn_backward(SdpaFused, inp, out, lse, dout, dmaps)

    @staticmethod
    def subject_forward(inp: SubjectInputs):
        if _split_lse(inp):
            return joint.subject_forward(SdpaFused, inp)
        return subject_forward(*_subject_args(inp), inp.return_maps)

    @staticmethod
    def subject_backward(inp: SubjectInputs, out, lse, lse_ref, diff, dout, dloss, dmaps):
        return joint.subject_backward(SdpaFused, inp, out, lse, lse_ref, diff, dout, dloss, dmaps)


def _split_lse(inp: SubjectInputs) -> bool:
    return inp.joint_ranges or inp.num_keys > LONG_KEYS


def _subject_args(inp: SubjectInputs) -> tuple:
    return (inp.q, inp.k, inp.v, inp.k_ref, inp.bias, inp.ref_bias, inp.tokens, inp.ref_tokens,
            inp.weights, inp.scale, inp.mean_heads, inp.detach_reference)
