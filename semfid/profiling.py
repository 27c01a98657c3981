"""Measurement helpers shared by tests and benchmarks."""

from __future__ import annotations

from typing import Callable, Dict

import torch


def saved_tensor_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``fn()`` runs.

    Counted with ``torch.autograd.graph.saved_tensors_hooks``; a storage saved several times (q
    saved by two ops, a view and its base) counts once. Deterministic, so it works for memory
    claims on a CPU. The graph built by ``fn`` is dropped when this returns.
    """
    storages: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    del result
    return sum(storages.values())
