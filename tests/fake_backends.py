"""Deliberately broken backends for tests/test_selftest.py (never registered on import).

Each is the torch backend with one defect the self-test must catch. The defects that would kill a
process act only inside a self-test child (``SEMFID_SELFTEST_CHILD=1``), so a test that calls
them by mistake in the pytest process fails instead of taking pytest down.
"""

from __future__ import annotations

import os
import signal

import torch

from semfid.backends.torch import TorchBackend
from semfid.selftest.runner import CHILD_ENV

NOISE_FILE_ENV = "SEMFID_TEST_NOISE_FILE"


def _in_child() -> bool:
    return os.environ.get(CHILD_ENV) == "1"


class GoodBackend(TorchBackend):
    """Correct (the torch backend under another name), validated only by its self-test."""

    NAME = "fake_good"
    PRIORITY = 5
    AUTO_DEVICES = frozenset()
    SELF_VALIDATED = True


class WrongBackend(GoodBackend):
    """Outputs 1 % too large: every case with an output fails."""

    NAME = "fake_wrong"

    @staticmethod
    def forward(inp):
        out, lse, maps = TorchBackend.forward(inp)
        return out.mul_(1.01), lse, maps.mul_(1.01)

    @staticmethod
    def subject_forward(inp):
        out, lse, lse_ref, loss, maps, diff = TorchBackend.subject_forward(inp)
        return out.mul_(1.01), lse, lse_ref, loss.mul_(1.01), maps, diff


class SegfaultBackend(GoodBackend):
    """Dies with SIGSEGV on its first forward, like a kernel that faults."""

    NAME = "fake_segfault"

    @staticmethod
    def forward(inp):
        if _in_child():
            os.kill(os.getpid(), signal.SIGSEGV)
        return TorchBackend.forward(inp)


class ExitBackend(GoodBackend):
    """Ends its process with os._exit(7) on its first forward."""

    NAME = "fake_exit"

    @staticmethod
    def forward(inp):
        if _in_child():
            os._exit(7)
        return TorchBackend.forward(inp)


class NondeterministicBackend(GoodBackend):
    """Accurate, but dk differs by one bit in every second process that runs it: only the
    two-process determinism check can see that (a counter file says which process is which)."""

    NAME = "fake_nondeterministic"
    _flip = None

    @classmethod
    def _flips(cls) -> bool:
        if cls._flip is None:
            path = os.environ[NOISE_FILE_ENV]
            count = int(open(path).read() or 0) if os.path.exists(path) else 0
            with open(path, "w") as f:
                f.write(str(count + 1))
            cls._flip = count % 2 == 1
        return cls._flip

    @staticmethod
    def subject_backward(inp, *args):
        dq, dk, dv, dk_ref = TorchBackend.subject_backward(inp, *args)
        if _in_child() and NondeterministicBackend._flips():
            bits = dk.view(torch.int16) if dk.element_size() == 2 else dk.view(torch.int32)
            bits[(0,) * bits.dim()] ^= 1
        return dq, dk, dv, dk_ref
