"""The run: gate every (implementation, mode), then time the good ones case by case.

On a GPU each implementation is timed with ``do_bench`` (L2 flushed); on a CPU the implementations of
one case are timed interleaved (round-robin), so load from other processes hits them alike. Per
subject fwd+bwd call the saved-for-backward bytes, the kernel launches and the modelled bytes moved
are recorded too (:mod:`attn_launches`). An implementation that compiles has a compile budget (its
own, or ``compile_budget_s`` for all): the seconds its gate and first calls may take before it is
no longer timed on new cases.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from _bench_utils import (
    SavedBytes, XattnShape, peak_memory_mib, progress, short_error, time_cpu_interleaved, time_cuda,
)
from attn_cases import make_inputs, mode_call
from attn_gate import UNSUPPORTED, check_implementation
from attn_launches import observe
from attn_traffic import compulsory_bytes
from baselines import Implementation


@dataclass
class Result:
    case: XattnShape
    impl: str
    mode: str
    batch: int
    ms_median: float
    ms_iqr: float
    saved_mib: Optional[float]
    peak_mib: Optional[float]
    gbps: Optional[float]
    pct_copy: Optional[float]
    launches: Optional[int] = None      # kernels launched by one call (subject_fwd_bwd only)
    moved_bytes: Optional[int] = None   # modelled bytes moved by those kernels


class CompileBudgets:
    """Seconds of compilation left per compiling implementation (others are never limited)."""

    def __init__(self, impls: List[Implementation], override_s: Optional[float] = None) -> None:
        self.left = {i.name: (override_s if override_s is not None else i.compile_budget_s)
                     for i in impls if i.compiles}

    def spent(self, impl: Implementation) -> bool:
        return impl.name in self.left and self.left[impl.name] <= 0

    def charge(self, impl: Implementation, seconds: float) -> None:
        if impl.name in self.left:
            self.left[impl.name] -= seconds


def gate(impls: List[Implementation], modes: List[str], device: torch.device, dtype: torch.dtype,
         budgets: CompileBudgets, skipped: Dict[str, str], log=print) -> List[Tuple[Implementation, str]]:
    """The (implementation, mode) pairs that are available here and pass the reference check;
    the others go to ``skipped`` ("impl/mode" -> why)."""
    runnable: List[Tuple[Implementation, str]] = []
    for impl in impls:
        try:
            reason = impl.unavailable(device, dtype)
        except Exception as exc:  # noqa: BLE001 - a broken probe makes the implementation unavailable
            reason = short_error(exc)
        for mode in modes:
            if impl.function(mode) is None:
                continue
            key = f"{impl.name}/{mode}"
            if reason is not None:
                skipped[key] = f"unavailable: {reason}"
                continue
            t0 = time.perf_counter()
            problem = check_implementation(impl, mode, device, dtype)
            budgets.charge(impl, time.perf_counter() - t0)
            if problem is not None and problem.startswith(UNSUPPORTED):
                skipped[key] = problem
            elif problem is not None:
                skipped[key] = f"REJECTED by the reference check: {problem}"
                log(f"!! {key}: {skipped[key]}")
            else:
                runnable.append((impl, mode))
    return runnable


def run_benchmarks(cases: List[XattnShape], batches: List[int], modes: List[str],
                   impls: List[Implementation], device: torch.device, dtype: torch.dtype, *,
                   budget_s: float, compile_budget_s: Optional[float] = None,
                   copy_gbs: Optional[float] = None, rep_ms: float = 100.0,
                   show_progress: bool = True, log=print) -> Tuple[List[Result], Dict[str, str]]:
    """Check every (implementation, mode) once, then time the good ones on every case.

    ``compile_budget_s`` replaces every compiling implementation's own budget when given.
    Returns the results and ``skipped``: "impl/mode[ case]" -> why it was not timed.
    """
    skipped: Dict[str, str] = {}
    budgets = CompileBudgets(impls, compile_budget_s)
    runnable = gate(impls, modes, device, dtype, budgets, skipped, log=log)
    groups = [(case, batch, mode) for case in cases for batch in batches for mode in modes]
    results: List[Result] = []
    bar = progress(groups, desc="attn_speed", enabled=show_progress)
    try:
        _time_groups(bar, runnable, skipped, results, device, dtype, budget_s=budget_s,
                     budgets=budgets, copy_gbs=copy_gbs, rep_ms=rep_ms)
    except KeyboardInterrupt:  # Ctrl-C or `timeout` (SIGTERM, see attn_speed.main): keep what was measured
        log("interrupted: reporting the measurements taken so far")
        skipped["everything/remaining cases"] = "not run: interrupted"
    return results, skipped


def _first_calls(runnable, mode, x, case, batch, device, budgets, skipped) -> Dict[str, tuple]:
    """First call of each implementation on this case: compiles / autotunes, and drops whatever
    fails. Returns name -> (implementation, call)."""
    calls: Dict[str, tuple] = {}
    for impl, impl_mode in runnable:
        if impl_mode != mode:
            continue
        key = f"{impl.name}/{mode}"
        if budgets.spent(impl):
            skipped.setdefault(key + " (some cases)", "compile time budget spent (--compile-budget-s)")
            continue
        call = mode_call(impl, mode, x)
        try:
            t0 = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize()
            budgets.charge(impl, time.perf_counter() - t0)
            calls[impl.name] = (impl, call)
        except Exception as exc:  # noqa: BLE001 - one failing case must not end the run
            skipped[f"{key} {case.name} B={batch}"] = f"failed: {short_error(exc)}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return calls


def _time_groups(bar, runnable, skipped, results, device, dtype, *, budget_s, budgets,
                 copy_gbs, rep_ms) -> None:
    inputs_key, x = None, None
    for case, batch, mode in bar:
        bar.set_postfix_str(f"{case.name} B={batch} {mode}")
        if inputs_key != (case.name, batch):
            x = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            x = make_inputs(batch, case.n_q, case.heads, case.head_dim, device, dtype)
            inputs_key = (case.name, batch)

        calls = _first_calls(runnable, mode, x, case, batch, device, budgets, skipped)
        if not calls:
            continue
        if device.type == "cuda":
            timings = {name: time_cuda(call, rep_ms=rep_ms) for name, (_, call) in calls.items()}
        else:
            timings = time_cpu_interleaved({n: c for n, (_, c) in calls.items()}, budget_s=budget_s)

        for name, (impl, call) in calls.items():
            saved = launches = moved = None
            if mode == "subject_fwd_bwd":
                with SavedBytes() as counter:  # counts at save time; the graph is dropped after
                    impl.subject(x.q, x.k, x.v, x.k_ref, x.tokens, x.scale)
                saved = counter.mib
                if not impl.compiles:  # a compiled graph's kernels are generated, not dispatched
                    seen = observe(call)
                    launches, moved = seen.launches, seen.bytes
            peak = peak_memory_mib(call, device)
            timing = timings[name]
            gbps = pct = None
            if device.type == "cuda":
                ideal = compulsory_bytes((batch, case.n_q, case.heads, case.head_dim), mode, dtype)
                gbps = ideal / (timing.median_ms * 1e-3) / 1e9
                pct = 100 * gbps / copy_gbs if copy_gbs else None
            results.append(Result(case, name, mode, batch, timing.median_ms, timing.iqr_ms,
                                  saved, peak, gbps, pct, launches, moved))
