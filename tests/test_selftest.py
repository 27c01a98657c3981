"""The self-validation mechanism (semfid.selftest), run on CPU.

Deliberately broken backends (tests/fake_backends.py: wrong values, a SIGSEGV, os._exit, a
one-bit nondeterminism between processes) must be rejected, cached as failed and refused by
``auto``; a correct one passes and is cached. Also: cache keying (a changed kernel source
invalidates), the SEMFID_SELFTEST opt-out and forced rerun, shipped verdicts, the file lock that
lets one of several concurrent callers run the test, an unusable cache directory, and the whole
mechanism on the real Triton backend under the interpreter (TRITON_INTERPRET=1 in the child).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch

import fake_backends
import semfid.selftest as selftest
from semfid import backends
from semfid.selftest import cache, runner, verdict_for

CPU = torch.device("cpu")


@pytest.fixture
def env(monkeypatch, tmp_path):
    """A private cache and shipped-verdict directory; ``register(cls)`` for a fake backend."""
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(selftest.MODE_ENV, raising=False)
    monkeypatch.delenv(runner.DEVICE_ENV, raising=False)
    monkeypatch.setattr(cache, "SHIPPED_DIR", tmp_path / "shipped")
    monkeypatch.setattr(selftest, "_WARNED", set())
    names = []

    def register(cls):
        backends.register_backend(cls)
        names.append(cls.NAME)
        return cls

    yield register
    for name in names:
        backends._REGISTRY.pop(name, None)
    backends.clear_selection_cache()


def _cached_files():
    return sorted(cache.cache_dir().glob("*.json")) if cache.cache_dir().is_dir() else []


def _failed_warnings(record):
    return [w for w in record if "failed their self-test" in str(w.message)]


@pytest.mark.slow
def test_correct_backend_passes_is_cached_and_force_reruns(env, monkeypatch, caplog):
    env(fake_backends.GoodBackend)
    with caplog.at_level(logging.WARNING, logger="semfid"):
        first = verdict_for("fake_good", CPU)
    assert first.passed and first.source == "ran", first.reason
    assert any("validated fake_good kernels" in r.getMessage() and "cached in" in r.getMessage()
               for r in caplog.records)
    [path] = _cached_files()
    record = json.loads(path.read_text())
    assert record["passed"] and record["key"]["backend"] == "fake_good" and record["passed_cases"] > 0
    again = verdict_for("fake_good", CPU)
    assert again.passed and again.source == "cache"
    monkeypatch.setenv(selftest.MODE_ENV, "force")
    forced = verdict_for("fake_good", CPU)
    assert forced.passed and forced.source == "ran"
    assert json.loads(path.read_text())["created"] > record["created"]


@pytest.mark.slow
def test_wrong_values_are_rejected_cached_and_warned_once(env):
    env(fake_backends.WrongBackend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = verdict_for("fake_wrong", CPU)
        second = verdict_for("fake_wrong", CPU)
    assert not first.passed and first.source == "ran"
    assert "xattn-D40" in first.reason and "out" in first.reason
    assert not second.passed and second.source == "cache"
    [warning] = _failed_warnings(caught)
    assert "python -m semfid.selftest --backend fake_wrong" in str(warning.message)
    [path] = _cached_files()
    assert json.loads(path.read_text())["passed"] is False


@pytest.mark.slow
@pytest.mark.parametrize("cls,death", [(fake_backends.SegfaultBackend, "SIGSEGV"),
                                       (fake_backends.ExitBackend, "exit status 7")],
                         ids=["sigsegv", "os_exit"])
def test_a_dying_kernel_is_rejected_and_the_caller_survives(env, cls, death):
    env(cls)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        verdict = verdict_for(cls.NAME, CPU)
    assert not verdict.passed and verdict.source == "ran"
    assert "child process died" in verdict.reason and death in verdict.reason
    assert verdict_for(cls.NAME, CPU).source == "cache"


@pytest.mark.slow
def test_nondeterminism_between_processes_is_rejected(env, monkeypatch, tmp_path):
    monkeypatch.setenv(fake_backends.NOISE_FILE_ENV, str(tmp_path / "noise"))
    env(fake_backends.NondeterministicBackend)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        verdict = verdict_for("fake_nondeterministic", CPU)
    assert not verdict.passed
    assert verdict.reason == "self-test failed: determinism: dq/dk/dv bits differ between two processes"


@pytest.mark.slow
def test_auto_skips_a_failed_backend_on_a_gpu(env, monkeypatch):
    """The lead's auto selection asks verdict_for for a CUDA device: simulate one GPU whose
    battery runs on the CPU. The broken backend is refused, naming why; the correct one is not."""
    monkeypatch.setattr(cache, "device_identity",
                        lambda device: {"device": "Fake GPU", "capability": "sm_90"})
    monkeypatch.setenv(runner.DEVICE_ENV, "cpu")
    env(fake_backends.WrongBackend)
    env(fake_backends.GoodBackend)
    gpu = torch.device("cuda", 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        refusal = fake_backends.WrongBackend.auto_refusal(gpu)
    assert refusal is not None and "self-test failed" in refusal and "xattn-D40" in refusal
    assert "python -m semfid.selftest --backend fake_wrong" in refusal
    assert len(_failed_warnings(caught)) == 1
    assert fake_backends.GoodBackend.auto_refusal(gpu) is None


@pytest.mark.slow
def test_changed_kernel_source_invalidates_the_verdict(env, monkeypatch, tmp_path):
    module = tmp_path / "fake_hashed_backend.py"
    module.write_text("from fake_backends import GoodBackend\n\n"
                      "class HashedBackend(GoodBackend):\n    NAME = 'fake_hashed'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = importlib.util.spec_from_file_location("fake_hashed_backend", module)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fake_hashed_backend"] = mod
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    spec.loader.exec_module(mod)
    env(mod.HashedBackend)
    before = cache.verdict_key(mod.HashedBackend, CPU)
    assert verdict_for("fake_hashed", CPU).source == "ran"
    assert verdict_for("fake_hashed", CPU).source == "cache"
    module.write_text(module.read_text() + "# an edited kernel\n")
    after = cache.verdict_key(mod.HashedBackend, CPU)
    assert after["sources"] != before["sources"]
    assert verdict_for("fake_hashed", CPU).source == "ran"
    assert len(_cached_files()) == 2


def test_opt_out_counts_only_shipped_verdicts(env, monkeypatch):
    env(fake_backends.GoodBackend)
    monkeypatch.setenv(selftest.MODE_ENV, "off")
    verdict = verdict_for("fake_good", CPU)
    assert not verdict.passed and verdict.source == "none" and "self-test off" in verdict.reason
    assert not cache.cache_dir().exists()  # nothing ran, nothing written
    key = cache.verdict_key(fake_backends.GoodBackend, CPU)
    cache.write_json(cache.SHIPPED_DIR / "fake_good-cpu.json", {"key": key, "passed": True})
    cache.write_json(cache.SHIPPED_DIR / "other.json",
                     {"key": dict(key, torch="0.0"), "passed": False})  # another key: ignored
    shipped = verdict_for("fake_good", CPU)
    assert shipped.passed and shipped.source == "shipped"


def test_one_of_several_concurrent_callers_runs_the_selftest(env, monkeypatch):
    """Ranks arriving together: the lock lets one run it; the others wait and read its verdict."""
    env(fake_backends.GoodBackend)
    runs = []

    def slow_run(cls, device, **kw):
        runs.append(cls.NAME)
        time.sleep(0.5)
        return {"key": cache.verdict_key(cls, device), "passed": True, "failures": [],
                "seconds": 0.5, "created": time.time()}

    monkeypatch.setattr(runner, "run_selftest", slow_run)
    results = []
    threads = [threading.Thread(target=lambda: results.append(verdict_for("fake_good", CPU)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert runs == ["fake_good"]
    assert sorted(v.source for v in results) == ["cache", "cache", "cache", "ran"]
    assert all(v.passed for v in results)


def test_unusable_cache_dir_degrades_with_one_warning(env, monkeypatch, tmp_path):
    env(fake_backends.GoodBackend)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(cache.CACHE_ENV, str(blocker / "cache"))
    monkeypatch.setattr(runner, "run_selftest", lambda *a, **k: pytest.fail("must not run"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = verdict_for("fake_good", CPU)
        second = verdict_for("fake_good", CPU)
    assert not first.passed and first.source == "none" and "cache unusable" in first.reason
    assert second == first
    assert len([w for w in caught if "self-test cache is unusable" in str(w.message)]) == 1


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_backend_under_the_interpreter(env, tmp_path, monkeypatch):
    """The real mechanism end to end on the Triton kernels: the CLI, children with
    TRITON_INTERPRET=1 set before triton is imported, --ship, then the shipped verdict counts."""
    run_env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run(
        [sys.executable, "-m", "semfid.selftest", "--backend", "triton", "--device", "cpu",
         "--quick", "--ship", str(cache.SHIPPED_DIR)],
        env=run_env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "triton: PASSED" in res.stdout and " 0 cases passed" not in res.stdout
    [shipped] = sorted(cache.SHIPPED_DIR.glob("triton-*.json"))
    record = json.loads(shipped.read_text())
    assert record["passed"] and record["key"]["sources"] != "missing"
    for path in _cached_files():
        path.unlink()  # only the shipped file is left
    monkeypatch.setenv(selftest.MODE_ENV, "off")
    verdict = verdict_for("triton", CPU)
    assert verdict.passed and verdict.source == "shipped", verdict.reason
