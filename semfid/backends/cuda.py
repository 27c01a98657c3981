"""Adapter to the hand-written CUDA kernels of the extension ``semfid._C`` (``csrc/``).

The kernels compile and link on machines without a GPU; their self-test has passed on one H200
(2026-12-04) and they have not been timed, so ``backend="auto"`` takes them only on a GPU where
:mod:`semfid.selftest` passed (``AUTO_DEVICES`` stays empty, ``SELF_VALIDATED`` is set); elsewhere
use ``backend="cuda"`` or ``SEMFID_BACKEND=cuda``.

What the kernels take (the table :mod:`semfid.backends.cuda_limits`, which ``csrc/`` is generated
from): CUDA tensors in float16 / bfloat16, at most ``MAX_KEYS`` keys per head (staged in shared
memory once per block) and ``MAX_SELECTED`` tokens per row, head dims ``HEAD_DIMS`` (SD1.5 and
SDXL), and a value dim equal to the head dim. Inputs are read through their strides (diffusers'
transposed views are not copied); ``out`` has [B, N, H, Dv] memory and every gradient the strides of
its input, as :mod:`semfid.backends.base` requires.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Tuple, Union

import torch

from .. import _cpp_lib
from .._inputs import SubjectInputs, XattnInputs
from . import cuda_limits
from .registry import register_backend
from .base import (BackendBase, BackwardResult, ForwardResult, SubjectBackwardResult,
                   SubjectForwardResult)


@functools.lru_cache(maxsize=None)
def _device_limits(index: int) -> Tuple[Tuple[int, int], Optional[int]]:
    """(compute capability, max dynamic shared memory per block) of a CUDA device."""
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), getattr(props, "shared_memory_per_block_optin", None)


@functools.lru_cache(maxsize=None)
def _smem_needed(subject: bool, head_dim: int, num_keys: int, num_selected: int, backward: bool) -> int:
    """Largest shared memory one block of the kernels of a pass asks for (semfid_C::smem_bytes)."""
    if subject:
        kernels = ("subject_fwd", "subject_bwd_dq", "bwd_dkdv") if backward else ("subject_fwd",)
    else:
        kernels = ("xattn_fwd", "xattn_bwd_dq", "bwd_dkdv") if backward else ("xattn_fwd",)
    return max(int(torch.ops.semfid_C.smem_bytes(k, head_dim, num_keys, max(1, num_selected)))
               for k in kernels)


def _max_shifted(bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """bias [B, H, M] minus its largest finite entry per (batch, head) row (the softmax is the same).

    The kernels work in log2 units and keep the lse in natural units, so a logit is rounded at the
    magnitude of its bias: with diffusers' -10000 padding on every key of a row, probabilities came
    out 1 +- 1e-3 instead of exactly 1 (the H200 self-test's fully masked single-key cases, dk off
    by up to 0.15 in bf16). After the shift the largest bias of each row is 0; keys far below it
    have probability ~0, so their rounding does not matter. Rows with no finite bias stay as they are.
    The kernels take full reference segments only (JOINT_RANGES is False), so bias and ref_bias
    each shift on their own."""
    if bias is None:
        return None
    top = bias.amax(dim=-1, keepdim=True)
    return bias - torch.where(torch.isfinite(top), top, torch.zeros_like(top))


@register_backend
class CudaBackend(BackendBase):
    NAME = "cuda"
    SUPPORTED_DEVICES = frozenset({"cuda"})
    SUPPORTED_DTYPES = frozenset({torch.float16, torch.bfloat16})
    MAX_HEAD_DIM = max(cuda_limits.HEAD_DIMS)
    MAX_KEYS = cuda_limits.MAX_KEYS
    PRIORITY = 20
    # Empty until the kernels are validated on real hardware: "auto" never picks cuda by itself.
    AUTO_DEVICES = frozenset()
    SELF_VALIDATED = True  # auto takes it on a GPU where semfid.selftest passed

    @classmethod
    def unavailable_reason(cls):
        return _cpp_lib.unavailable_reason()

    @classmethod
    def status(cls) -> str:
        reason = _cpp_lib.unavailable_reason()
        if reason is not None:
            return ("not built: " if _cpp_lib.is_missing() else "built but not loadable: ") + reason
        return ("compiled; self-test passed on one H200 by its authors, not yet timed: auto takes it on a "
                "GPU where `python -m semfid.selftest --backend cuda` passed; else opt-in (backend='cuda')")

    @classmethod
    def not_supported_reasons(cls, inp: Union[XattnInputs, SubjectInputs]) -> List[str]:
        reasons = super().not_supported_reasons(inp)
        if inp.head_dim not in cuda_limits.HEAD_DIMS:
            reasons.append(f"head_dim={inp.head_dim} (supported: {list(cuda_limits.HEAD_DIMS)})")
        if inp.v is not None and inp.value_dim != inp.head_dim:
            reasons.append(f"value_dim={inp.value_dim} != head_dim={inp.head_dim}")
        if inp.num_selected > cuda_limits.MAX_SELECTED:
            reasons.append(f"num_selected={inp.num_selected} > {cuda_limits.MAX_SELECTED}")
        if not reasons and inp.device.type == "cuda":
            reasons.extend(cls._device_reasons(inp))
        return reasons

    @staticmethod
    def _device_reasons(inp: Union[XattnInputs, SubjectInputs]) -> List[str]:
        """The GPU itself: sm_80+ (mma.sync), and enough shared memory per block for these shapes
        (e.g. sm_86 / sm_89 have 99 KiB, less than the head dim 160 backward needs)."""
        if torch.compiler.is_compiling():
            return []
        index = inp.device.index if inp.device.index is not None else torch.cuda.current_device()
        (major, minor), smem_limit = _device_limits(index)
        if (major, minor) < (8, 0):
            return [f"compute capability {major}.{minor} < 8.0 (the kernels use sm_80 tensor-core mma.sync)"]
        subject = isinstance(inp, SubjectInputs)
        needed = _smem_needed(subject, inp.head_dim, inp.num_keys, inp.num_selected, inp.needs_grad)
        if smem_limit is not None and needed > smem_limit:
            what = "forward + backward" if inp.needs_grad else "forward"
            return [f"{what} needs {needed} bytes of shared memory per block for head_dim={inp.head_dim}, "
                    f"num_keys={inp.num_keys}, num_selected={inp.num_selected}; this GPU allows {smem_limit}"]
        return []

    @staticmethod
    def forward(inp: XattnInputs) -> ForwardResult:
        bias = _max_shifted(inp.bias)
        return torch.ops.semfid_C.xattn_fwd(inp.q, inp.k, inp.v, bias, inp.select, float(inp.scale),
                                            bool(inp.mean_heads))

    @staticmethod
    def backward(inp: XattnInputs, out, lse, dout, dmaps) -> BackwardResult:
        bias = _max_shifted(inp.bias)
        return torch.ops.semfid_C.xattn_bwd(inp.q, inp.k, inp.v, bias, inp.select, float(inp.scale),
                                            bool(inp.mean_heads), out, lse, dout, dmaps)

    @staticmethod
    def subject_forward(inp: SubjectInputs) -> SubjectForwardResult:
        bias, ref_bias = _max_shifted(inp.bias), _max_shifted(inp.ref_bias)
        return torch.ops.semfid_C.subject_fwd(
            inp.q, inp.k, inp.v, inp.k_ref, bias, ref_bias, inp.tokens, inp.ref_tokens, inp.weights,
            float(inp.scale), bool(inp.mean_heads), bool(inp.detach_reference), bool(inp.return_maps))

    @staticmethod
    def subject_backward(inp: SubjectInputs, out, lse, lse_ref, diff, dout, dloss, dmaps) -> SubjectBackwardResult:
        bias, ref_bias = _max_shifted(inp.bias), _max_shifted(inp.ref_bias)
        return torch.ops.semfid_C.subject_bwd(
            inp.q, inp.k, inp.v, inp.k_ref, bias, ref_bias, inp.tokens, inp.ref_tokens, inp.weights,
            float(inp.scale), bool(inp.mean_heads), bool(inp.detach_reference), out, lse, lse_ref, diff, dout,
            dloss, dmaps)
