"""Measurement helpers shared by the tests and the benchmarks."""

from __future__ import annotations

from typing import Callable, Dict, Hashable

import torch


class SavedBytes:
    """Context manager counting the bytes autograd keeps for backward inside it.

    Every tensor packed by autograd (``saved_tensors_hooks``) is recorded by its storage; a storage
    shared by several saved tensors (views, q saved by two ops) counts once, at its full size,
    since the whole storage stays alive. Inputs saved for backward count too. Deterministic, so it
    serves memory claims on a CPU.
    """

    def __init__(self) -> None:
        self._storages: Dict[Hashable, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            self._storages[(t.device, storage.data_ptr())] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
            self._storages[("id", id(t))] = t.numel() * t.element_size()
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def __enter__(self) -> "SavedBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        return int(sum(self._storages.values()))

    @property
    def mib(self) -> float:
        return self.nbytes / 2**20


def saved_tensor_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``fn()`` runs (see
    :class:`SavedBytes`). The graph built by ``fn`` is dropped when this returns."""
    with SavedBytes() as counter:
        result = fn()
    del result
    return counter.nbytes
