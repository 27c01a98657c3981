"""Run the battery in child processes, so a kernel that faults cannot take the caller down.

A CUDA fault (illegal address, a Triton assert) poisons the CUDA context of the process that hit
it; no in-process recovery exists. The parent therefore never runs a kernel under test: it starts
``python -m semfid.selftest.runner`` twice (the battery, then the determinism digest alone in a
second fresh process), reads their JSON reports and turns a crash, a hang or a non-zero exit into
a failed verdict naming it.

Test hooks (never needed in production): ``--backend-module pkg.mod:Class`` imports a backend the
registry does not know (the child imports it too), and ``SEMFID_SELFTEST_DEVICE=cpu`` runs the
child's battery on that device whatever device the verdict is for.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import torch

CHILD_ENV = "SEMFID_SELFTEST_CHILD"
DEVICE_ENV = "SEMFID_SELFTEST_DEVICE"
TIMEOUT_ENV = "SEMFID_SELFTEST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0


def backend_spec(cls: type) -> str:
    """``module:Class``: the child imports (and so registers) exactly the parent's class."""
    return f"{cls.__module__}:{cls.__qualname__}"


def import_backend(spec: str) -> None:
    """Import ``module:Class`` (registering the class with the backend registry)."""
    import importlib

    from ..backends import register_backend

    module, _, name = spec.partition(":")
    cls = getattr(importlib.import_module(module), name)
    register_backend(cls)


def _child_env() -> dict:
    env = dict(os.environ)
    env[CHILD_ENV] = "1"
    env["SEMFID_SELFTEST"] = "off"  # the child never starts a self-test of its own
    # The child imports what the parent imports (an uninstalled checkout, the tests' fakes).
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}"


def _spawn(args: List[str], timeout: float, verbose: bool) -> dict:
    """Run one child; its JSON report, or ``{"crash": reason}``."""
    with tempfile.TemporaryDirectory(prefix="semfid-selftest-") as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "semfid.selftest.runner", *args, "--out", str(report)]
        try:
            res = subprocess.run(cmd, env=_child_env(), timeout=timeout, text=True,
                                 stdout=None if verbose else subprocess.PIPE,
                                 stderr=None if verbose else subprocess.STDOUT)
        except subprocess.TimeoutExpired:
            return {"crash": f"the self-test child did not finish within {timeout:.0f} s"}
        tail = "" if verbose else (res.stdout or "").strip().splitlines()[-3:]
        if res.returncode != 0 or not report.exists():
            detail = "; ".join(tail) if tail else ""
            return {"crash": f"the self-test child process died ({_describe_exit(res.returncode)})"
                             + (f": {detail}" if detail else "")}
        return json.loads(report.read_text())


def run_selftest(cls: type, device: torch.device, *, quick: Optional[bool] = None,
                 verbose: bool = False) -> dict:
    """Run the battery for backend class ``cls`` on ``device``; the verdict record (not saved).
    ``quick`` defaults to the full battery on a GPU and the quick one elsewhere."""
    from .cache import verdict_key

    timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    run_device = os.environ.get(DEVICE_ENV) or str(device)
    if quick is None:
        quick = torch.device(run_device).type != "cuda"
    args = ["--backend", cls.NAME, "--device", run_device] + (["--quick"] if quick else [])
    args += ["--backend-module", backend_spec(cls)]
    start = time.monotonic()
    first = _spawn(args, timeout, verbose)
    failures: List[str] = []
    if "crash" in first:
        failures.append(first["crash"])
    else:
        failures += first["failures"]
        if first["passed_cases"] == 0 and not failures:
            failures.append("no case ran: the backend declined every input "
                            f"(skipped: {', '.join(first['skipped'][:3])})")
        second = _spawn(args + ["--digest-only"], timeout, verbose=False)
        if "crash" in second:
            failures.append(f"determinism check: {second['crash']}")
        elif second["digest"] != first["digest"]:
            failures.append("determinism: dq/dk/dv bits differ between two processes")
    return {
        "key": verdict_key(cls, device),
        "passed": not failures,
        "failures": failures,
        "passed_cases": first.get("passed_cases", 0),
        "skipped": first.get("skipped", []),
        "battery": "quick" if quick else "full",
        "seconds": round(time.monotonic() - start, 1),
        "created": time.time(),
    }


# ---- the child ------------------------------------------------------------------------------
def child_main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m semfid.selftest.runner")
    parser.add_argument("--backend", required=True)
    parser.add_argument("--device", required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backend-module")
    parser.add_argument("--digest-only", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from . import battery

    if args.backend_module:
        import_backend(args.backend_module)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    if args.digest_only:
        report = {"digest": battery.digest(args.backend, device, args.quick)}
    else:
        report = battery.run_battery(args.backend, device, args.quick,
                                     log=lambda line: print(line, flush=True))
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # an asynchronous fault surfaces here, as a crash
    Path(args.out).write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
