"""Adapter to the CUDA C++ extension ``semfid._C`` (work in progress: not registered as usable yet)."""

from __future__ import annotations

import torch

from . import register_backend
from .base import BackendBase


@register_backend
class CudaBackend(BackendBase):
    NAME = "cuda"
    SUPPORTED_DEVICES = frozenset({"cuda"})
    SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16})
    MAX_KEYS = 128
    PRIORITY = 20

    @classmethod
    def unavailable_reason(cls):
        return "the CUDA extension is not implemented yet"
