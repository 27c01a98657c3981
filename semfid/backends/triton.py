"""Adapter to the Triton kernels in ``semfid.kernels`` (work in progress: not registered as usable yet)."""

from __future__ import annotations

import torch

from . import register_backend
from .base import BackendBase


@register_backend
class TritonBackend(BackendBase):
    NAME = "triton"
    SUPPORTED_DEVICES = frozenset({"cuda"})
    SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
    MAX_HEAD_DIM = 256
    MAX_KEYS = 256
    PRIORITY = 10

    @classmethod
    def unavailable_reason(cls):
        return "the Triton kernels are not implemented yet"
