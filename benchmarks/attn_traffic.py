"""Memory traffic: the compulsory bytes of a mode, and the bytes an implementation's passes move.

*Compulsory* (:func:`compulsory_bytes`) is what an ideal fused kernel must move, each tensor read or
written once. *Modelled* bytes come from observing what really runs (:mod:`attn_launches`): every
kernel reads or writes each tensor it is given once (its memory extent, so an expanded view counts
its storage, not its view). Re-reads that hit a cache are not counted, so the model is a lower
bound of the real traffic of each pass; the ratio modelled / compulsory says how many extra passes
over HBM-sized tensors an implementation makes.
"""

from __future__ import annotations

from typing import Iterable, Tuple

import torch

from _bench_utils import NUM_TEXT_TOKENS
from attn_cases import NUM_MAP_TOKENS


def compulsory_bytes(shape_batch: Tuple[int, int, int, int], mode: str, dtype: torch.dtype,
                     num_keys: int = NUM_TEXT_TOKENS, num_tokens: int = NUM_MAP_TOKENS) -> int:
    """Compulsory HBM traffic of one call of ``mode`` on ``(B, N, H, D)``.

    forward: read q, k, v; write out. forward_maps: + write the head-mean maps (fp32 [B, N, S]).
    subject_fwd_bwd: forward reads q, k, v, k_ref and writes out, lse (fp32) and the head-mean map
    difference A_t − A_r (fp32 [B, N, S], what backward needs of the reference); backward reads
    q, k, v, out, dout, lse and that difference, and writes dq, dk, dv.
    """
    B, N, H, D = shape_batch
    e = torch.finfo(dtype).bits // 8
    qo = B * H * N * D * e             # q, out, dout, dq: one each
    kv = B * H * num_keys * D * e      # k, v, k_ref, dk, dv: one each
    maps = B * N * num_tokens * 4
    lse = B * H * N * 4
    if mode == "forward":
        return 2 * qo + 2 * kv
    if mode == "forward_maps":
        return 2 * qo + 2 * kv + maps
    fwd = 2 * qo + 3 * kv + lse + maps                # q, out + k, v, k_ref + lse + diff
    bwd = 4 * qo + 2 * kv + lse + maps + 2 * kv       # q, out, dout, dq + k, v + lse + diff + dk, dv
    return fwd + bwd


def extent_bytes(t: torch.Tensor) -> int:
    """Bytes of memory a kernel touches reading or writing all of ``t`` once: its elements, or
    fewer when strides repeat elements (an expanded view touches its storage once)."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    return min(span, t.numel()) * t.element_size()


def tensors_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """:func:`extent_bytes` summed over distinct tensors (the same view passed twice, e.g. an
    in-place op's input and output, counts once)."""
    seen = set()
    total = 0
    for t in tensors:
        if t.device.type == "meta":
            continue
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in seen:
            seen.add(key)
            total += extent_bytes(t)
    return total
