"""Shared test configuration: seeding, markers, and which backends the op tests run against.

Environment:
  SEMFID_TEST_BACKENDS  comma-separated backends to test (default: every registered backend that
                        can run a small input on SEMFID_TEST_DEVICE).
  SEMFID_TEST_DEVICE    "cpu" (default) or "cuda".
"""

from __future__ import annotations

import os
import random
import zlib

import pytest
import torch

try:
    import semfid  # noqa: F401
    from semfid._inputs import XattnInputs
    from semfid.backends import registered_backends
except ImportError as exc:  # pragma: no cover - only when the package is not installed
    raise pytest.UsageError(
        f"semfid is not importable ({exc}); install it first: pip install --no-build-isolation -e '.[test]'"
    )


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh but reproducible random inputs per test: the seed depends on the test id
    (and on SEMFID_TEST_SEED, to draw a new set of inputs for every case)."""
    salt = os.environ.get("SEMFID_TEST_SEED", "")
    seed = zlib.crc32((request.node.nodeid + salt).encode())
    random.seed(seed)
    torch.manual_seed(seed)
    yield


def device_under_test() -> torch.device:
    name = os.environ.get("SEMFID_TEST_DEVICE", "cpu")
    return torch.device(name)


def backends_under_test() -> list:
    """Names of the backends the op tests are parametrized over."""
    requested = os.environ.get("SEMFID_TEST_BACKENDS", "").strip()
    if requested:
        return [b.strip() for b in requested.split(",") if b.strip()]
    device = device_under_test()
    probe = XattnInputs.validate(
        torch.zeros(1, 1, 1, 8, device=device), torch.zeros(1, 1, 1, 8, device=device),
        torch.zeros(1, 1, 1, 8, device=device),
    )
    return [b.NAME for b in registered_backends() if not b.not_supported_reasons(probe)]


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none is present)")
    for item in items:
        if item.get_closest_marker("gpu") is not None and not has_cuda:
            item.add_marker(skip_gpu)
