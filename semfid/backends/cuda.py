"""Adapter to the hand-written CUDA kernels of the extension ``semfid._C`` (``csrc/``).

Opt-in only: the kernels compile and link on machines without a GPU, but ``backend="auto"`` must not
choose them until the GPU test suite (``pytest -m gpu tests/test_cuda_ext.py``) has passed on a real
device, so ``AUTO_DEVICES`` stays empty and ``status()`` says so. Use ``backend="cuda"`` or
``SEMFID_BACKEND=cuda``.

What the kernels take: CUDA tensors in float16 / bfloat16, at most 128 keys per head (staged in shared
memory once per block), head dims 40, 64, 80, 128, 160 (SD1.5 and SDXL), and a value dim equal to the
head dim. The extension copies k and v to contiguous memory (they are small) and reads q and dout
through their strides (copying only when rows are not 16-byte aligned); outputs have the layouts of
the fake implementations in :mod:`semfid.ops` (``out`` contiguous, ``dq`` like ``q``).
"""

from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch

from .. import _cpp_lib
from .._inputs import XattnInputs
from . import register_backend
from .base import BackendBase, BackwardResult, ForwardResult

SUPPORTED_HEAD_DIMS = (40, 64, 80, 128, 160)


@functools.lru_cache(maxsize=None)
def _device_limits(index: int) -> Tuple[Tuple[int, int], Optional[int]]:
    """(compute capability, max dynamic shared memory per block) of a CUDA device."""
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), getattr(props, "shared_memory_per_block_optin", None)


@functools.lru_cache(maxsize=None)
def _smem_needed(head_dim: int, num_keys: int, backward: bool) -> int:
    """Largest shared memory one block of the kernels of a pass asks for (semfid_C::smem_bytes)."""
    kernels = ("fwd", "bwd_dq", "bwd_dkdv") if backward else ("fwd",)
    return max(int(torch.ops.semfid_C.smem_bytes(k, head_dim, num_keys)) for k in kernels)


@register_backend
class CudaBackend(BackendBase):
    NAME = "cuda"
    SUPPORTED_DEVICES = frozenset({"cuda"})
    SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16})
    MAX_HEAD_DIM = max(SUPPORTED_HEAD_DIMS)
    MAX_KEYS = 128
    PRIORITY = 20
    # Empty until the GPU tests have passed on a real device (issue 5): "auto" never picks cuda.
    AUTO_DEVICES = frozenset()

    @classmethod
    def unavailable_reason(cls):
        return _cpp_lib.unavailable_reason()

    @classmethod
    def status(cls) -> str:
        reason = _cpp_lib.unavailable_reason()
        if reason is not None:
            return ("not built: " if _cpp_lib.is_missing() else "built but not loadable: ") + reason
        return "compiled, not yet validated on a GPU (opt-in: backend='cuda')"

    @classmethod
    def not_supported_reasons(cls, inp: XattnInputs) -> List[str]:
        reasons = super().not_supported_reasons(inp)
        if inp.head_dim not in SUPPORTED_HEAD_DIMS:
            reasons.append(f"head_dim={inp.head_dim} (supported: {list(SUPPORTED_HEAD_DIMS)})")
        if inp.v is not None and inp.value_dim != inp.head_dim:
            reasons.append(f"value_dim={inp.value_dim} != head_dim={inp.head_dim}")
        if not reasons and inp.device.type == "cuda":
            reasons.extend(cls._device_reasons(inp))
        return reasons

    @staticmethod
    def _device_reasons(inp: XattnInputs) -> List[str]:
        """The GPU itself: sm_80+ (mma.sync), and enough shared memory per block for these shapes
        (e.g. sm_86 / sm_89 have 99 KiB, less than the head dim 160 backward needs)."""
        if torch.compiler.is_compiling():
            return []
        index = inp.device.index if inp.device.index is not None else torch.cuda.current_device()
        (major, minor), smem_limit = _device_limits(index)
        if (major, minor) < (8, 0):
            return [f"compute capability {major}.{minor} < 8.0 (the kernels use sm_80 tensor-core mma.sync)"]
        backward = any(t is not None and t.requires_grad for t in (inp.q, inp.k, inp.v))
        needed = _smem_needed(inp.head_dim, inp.num_keys, backward)
        if smem_limit is not None and needed > smem_limit:
            what = "forward + backward" if backward else "forward"
            return [f"{what} needs {needed} bytes of shared memory per block for head_dim={inp.head_dim}, "
                    f"num_keys={inp.num_keys}; this GPU allows {smem_limit}"]
        return []

    @staticmethod
    def forward(inp: XattnInputs) -> ForwardResult:
        out, lse, maps = torch.ops.semfid_C.fwd(inp.q, inp.k, inp.v, inp.bias, inp.select,
                                                float(inp.scale), bool(inp.mean_heads))
        return out, lse, maps

    @staticmethod
    def backward(inp: XattnInputs, out, lse, dout, dmaps) -> BackwardResult:
        dq, dk, dv = torch.ops.semfid_C.bwd(
            inp.q, inp.k, inp.v, inp.bias, inp.select, float(inp.scale), bool(inp.mean_heads), out,
            lse, dout, dmaps,
        )
        return dq, dk, dv
