"""pytest plugin: install semfid into every supported diffusers model a test suite builds.

Run any test suite (diffusers' own, yours) with semfid's processors standing in for diffusers'::

    python -m pytest -p semfid.testing.install_everywhere tests/...
    python -m pytest -p semfid.testing.install_everywhere --semfid-report=installs.json tests/...

At the end of each ``__init__`` of a supported model class (``UNet2DConditionModel`` and the other
families :func:`semfid.diffusers.install` takes; built directly, ``from_config`` or
``from_pretrained``), :func:`semfid.diffusers.install` runs on the new model with every layer
chosen. No ``with`` block is ever opened, so the suite checks the drop-in promise: with nothing
requested, an installed model behaves as the stock one under every diffusers API the suite uses.
Where ``install`` refuses (a model it cannot stand in for), the model stays stock and the refusal
is recorded with its reason; the terminal summary counts installs and refusals per reason, and
``--semfid-report`` writes every event (test id, model class, installed or the error) as JSON.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import Counter
from typing import Dict, List

_EVENTS: List[Dict[str, str]] = []
_STATE = threading.local()
_CURRENT = {"test": "<collection>"}
_PATCHED: list = []


def _supported_classes() -> list:
    import diffusers

    try:
        from semfid.diffusers.families import FAMILIES

        names = list(FAMILIES)
    except ImportError:  # a semfid without the model-family table: UNets only
        names = ["UNet2DConditionModel"]
    return [getattr(diffusers, n) for n in names if hasattr(diffusers, n)]


def _install(model) -> None:
    from semfid.diffusers import install

    event = {"test": _CURRENT["test"], "model": type(model).__name__}
    try:
        install(model)
        event["installed"] = "yes"
    except (ValueError, TypeError) as exc:  # refused: the model stays stock
        event["installed"] = "no"
        event["error"] = f"{type(exc).__name__}: {exc}"
    _EVENTS.append(event)


def _wrap_init(cls) -> None:
    original = cls.__dict__["__init__"]

    @functools.wraps(original)  # keeps the signature diffusers' from_config reads
    def __init__(self, *args, **kwargs):
        depth = getattr(_STATE, "depth", 0)
        _STATE.depth = depth + 1
        try:
            original(self, *args, **kwargs)
        finally:
            _STATE.depth = depth
        if depth == 0:  # the outermost __init__ (a subclass calling super().__init__ finishes first)
            _install(self)

    cls.__init__ = __init__
    _PATCHED.append((cls, original))


def pytest_addoption(parser) -> None:
    parser.addoption("--semfid-report", default=None, metavar="PATH",
                     help="write every install / refusal of semfid.testing.install_everywhere as JSON")


def pytest_configure(config) -> None:
    for cls in _supported_classes():
        if "__init__" in cls.__dict__:
            _wrap_init(cls)


def pytest_unconfigure(config) -> None:
    while _PATCHED:
        cls, original = _PATCHED.pop()
        cls.__init__ = original
    path = config.getoption("--semfid-report", default=None)
    if path:
        with open(path, "w") as f:
            json.dump(_EVENTS, f, indent=1)


def pytest_runtest_protocol(item, nextitem):
    _CURRENT["test"] = item.nodeid
    return None  # the default protocol runs the test


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    installed = sum(e["installed"] == "yes" for e in _EVENTS)
    refused = Counter(f'{e["model"]}: {e["error"][:160]}' for e in _EVENTS if e["installed"] == "no")
    terminalreporter.section("semfid.testing.install_everywhere")
    terminalreporter.write_line(f"models built: {len(_EVENTS)}, semfid installed: {installed}, "
                                f"refused: {sum(refused.values())}")
    for reason, n in refused.most_common():
        terminalreporter.write_line(f"  {n:4d} x refused  {reason}")


__all__ = ["pytest_addoption", "pytest_configure", "pytest_unconfigure", "pytest_runtest_protocol",
           "pytest_terminal_summary"]
