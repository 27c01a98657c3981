"""How fast is semfid on the cross-attention shapes of Stable Diffusion, against what people use today?

Runs every semfid backend available here and the baselines of ``benchmarks/baselines.py`` on every
distinct cross-attention shape of SD1.5 (512 px) and SDXL (1024 px), in three modes:

* ``forward``          attention output only;
* ``forward_maps``     output + head-mean maps of 10 tokens (inference-time map capture);
* ``subject_fwd_bwd``  output + SeFi-IDE subject loss, forward and backward (training).

Each implementation is first checked against the float64 reference on a small case, on the device
and dtype of the run; a wrong one is reported and skipped, never timed.

    python benchmarks/attn_speed.py                 # GPU: every case at batch 2 and 8; CPU: --quick
    python benchmarks/attn_speed.py --quick --json results.json --plot speedup.png
    python benchmarks/attn_speed.py --cases sd15_64 --modes subject_fwd_bwd --impl semfid eager
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from _bench_utils import (  # noqa: E402
    NUM_TEXT_TOKENS, REPO_ROOT, SD_SHAPES, SHAPES_BY_NAME, SavedBytes, XattnShape,
    copy_bandwidth_gbs, environment, format_environment, peak_memory_mib, progress, time_cpu_interleaved,
    time_cuda,
)
from baselines import MODES, Implementation, baseline_implementations  # noqa: E402

NUM_MAP_TOKENS = 10  # "head-mean maps of 10 tokens": a prompt's worth of words
QUICK_CASES = [s.name for s in SD_SHAPES]  # every shape, but batch 2 only and a short time budget
QUICK_BATCHES = [2]
GPU_BATCHES = [2, 8]
RECORD_FIELDS = ("case", "impl", "mode", "device", "dtype", "batch", "ms_median", "ms_iqr",
                 "saved_mib", "peak_mib")


# ------------------------------------------------------------------------------------------------
# implementations
# ------------------------------------------------------------------------------------------------
def _short_error(exc: BaseException) -> str:
    """One line for the report. semfid's dispatcher errors keep their per-backend reasons only
    (their second line is a long summary of the inputs)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reasons = [line for line in lines if "cannot run them:" in line]
    text = "; ".join(reasons) if reasons else (lines[0] if lines else "")
    return f"{type(exc).__name__}: {text[:300]}"


def semfid_implementation(backend: str) -> Implementation:
    """semfid's public ops with ``backend=`` fixed; named ``semfid`` for auto, ``semfid_<b>`` else."""
    import semfid

    def forward(q, k, v, scale):
        return semfid.cross_attention(q, k, v, scale=scale, backend=backend)

    def forward_maps(q, k, v, tokens, scale):
        return semfid.cross_attention(q, k, v, scale=scale, select=tokens, head_reduce="mean",
                                      backend=backend)

    def subject(q, k, v, k_ref, tokens, scale):
        return semfid.subject_attention(q, k, v, k_ref, tokens=tokens, scale=scale,
                                        head_reduce="mean", backend=backend)

    def unavailable(device, dtype):
        """Ask semfid's dispatcher whether the backend takes a CUDA/CPU input of this dtype."""
        from semfid._inputs import XattnInputs
        from semfid.backends import select_backend

        x = make_inputs(**CHECK_SHAPE, device=device, dtype=dtype)
        inp = XattnInputs.validate(x.q, x.k, x.v, scale=x.scale, attn_bias=None, select=x.tokens,
                                   head_reduce="mean")
        try:
            select_backend(inp, backend)
        except ValueError as exc:
            return _short_error(exc)
        return None

    name = "semfid" if backend == "auto" else f"semfid_{backend}"
    return Implementation(name, forward, forward_maps, subject, f"semfid, backend={backend!r}",
                          unavailable=unavailable)


def all_implementations() -> List[Implementation]:
    """semfid (auto), one semfid_<backend> per available backend, then the baselines."""
    try:
        import semfid

        backends = ["auto"] + list(semfid.available_backends())
    except Exception as exc:  # noqa: BLE001 - report instead of dying: the baselines still run
        print(f"warning: import semfid failed ({exc}); timing the baselines only", file=sys.stderr)
        backends = []
    return [semfid_implementation(b) for b in backends] + baseline_implementations()


# ------------------------------------------------------------------------------------------------
# inputs and one call per mode
# ------------------------------------------------------------------------------------------------
@dataclass
class CaseInputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_ref: torch.Tensor
    tokens: torch.Tensor
    scale: float
    dout: torch.Tensor
    dloss: torch.Tensor


def make_inputs(batch: int, n_q: int, heads: int, head_dim: int, device: torch.device,
                dtype: torch.dtype, *, num_keys: int = NUM_TEXT_TOKENS,
                num_tokens: int = NUM_MAP_TOKENS, seed: int = 0) -> CaseInputs:
    """Inputs laid out as a diffusers processor has them: [B, N, H·D] projections viewed as
    [B, H, N, D] (non-contiguous), q/k/v requiring grad, the reference keys not."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def proj(n, requires_grad):
        base = torch.randn(batch, n, heads * head_dim, generator=gen).to(device=device, dtype=dtype)
        base.requires_grad_(requires_grad)
        return base.view(batch, n, heads, head_dim).transpose(1, 2)

    q, k, v = proj(n_q, True), proj(num_keys, True), proj(num_keys, True)
    k_ref = proj(num_keys, False)
    tokens = torch.arange(1, 1 + num_tokens, device=device) % num_keys
    dout = torch.randn(q.shape, generator=gen).to(device=device, dtype=dtype)
    dloss = torch.ones(batch, device=device, dtype=torch.float32)
    return CaseInputs(q, k, v, k_ref, tokens, head_dim ** -0.5, dout, dloss)


def _grads(outputs: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor],
           inputs: Sequence[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    """torch.autograd.grad over the outputs that carry a graph (a floor's zero loss does not)."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
    return torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)


def mode_call(impl: Implementation, mode: str, x: CaseInputs):
    """A no-argument callable running ``mode`` of ``impl`` once (what the timer repeats)."""
    fn = impl.function(mode)
    if mode == "forward":
        def call():
            with torch.no_grad():
                return fn(x.q, x.k, x.v, x.scale)
    elif mode == "forward_maps":
        def call():
            with torch.no_grad():
                return fn(x.q, x.k, x.v, x.tokens, x.scale)
    else:
        def call():
            out, loss = fn(x.q, x.k, x.v, x.k_ref, x.tokens, x.scale)
            return _grads((out, loss), (x.dout, x.dloss), (x.q, x.k, x.v))
    return call


def traffic_bytes(shape_batch: Tuple[int, int, int, int], mode: str, dtype: torch.dtype,
                  num_keys: int = NUM_TEXT_TOKENS, num_tokens: int = NUM_MAP_TOKENS) -> int:
    """Compulsory HBM traffic of an ideal fused kernel (each tensor read or written once).

    forward: read q, k, v; write out. forward_maps: + write the head-mean maps (fp32).
    subject_fwd_bwd: forward reads q, k, v, k_ref, writes out, lse (fp32) and both head-mean maps;
    backward reads q, k, v, out, dout, lse and the map gradient, writes dq, dk, dv.
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
    fwd = 2 * qo + 3 * kv + lse + 2 * maps
    bwd = 4 * qo + 2 * kv + lse + maps + 2 * kv  # q,out,dout,dq + k,v + lse + dmaps + dk,dv
    return fwd + bwd


# ------------------------------------------------------------------------------------------------
# correctness gate
# ------------------------------------------------------------------------------------------------
CHECK_SHAPE = dict(batch=2, n_q=67, heads=3, head_dim=40)  # odd query count, SD1.5's head dim


def check_implementation(impl: Implementation, mode: str, device: torch.device, dtype: torch.dtype,
                         *, seed: int = 1) -> Optional[str]:
    """None when ``impl`` matches the float64 reference on a small case in ``mode``, else why not.

    Rule (flash-attention's): max error ≤ 3 × the error of plain PyTorch at the same dtype plus a few
    ulps, for the output, the maps, the loss and the gradients of the output and of the loss
    (checked separately, so a missing loss gradient cannot hide under the output's).
    """
    from semfid import testing as ref
    x = make_inputs(device=device, dtype=dtype, seed=seed, **CHECK_SHAPE)
    fn = impl.function(mode)
    if fn is None:
        return f"{impl.name} has no {mode} mode"

    def compare(name, got, ref64, plain):
        atol = ref.ulp_atol(dtype, float(ref64.detach().abs().max()) if ref64.numel() else 1.0)
        ref.assert_close_rule(name, got, ref64, plain, factor=3.0, atol=atol)

    def leaves(upcast_dtype):
        ts = [t.detach().to(upcast_dtype).requires_grad_(True) for t in (x.q, x.k, x.v)]
        return ts + [x.k_ref.detach().to(upcast_dtype)]

    try:
        if mode in ("forward", "forward_maps"):
            select = x.tokens if mode == "forward_maps" else None
            with torch.no_grad():
                got = fn(x.q, x.k, x.v, x.scale) if select is None else fn(x.q, x.k, x.v, x.tokens, x.scale)
                want = ref.attention_ref(x.q, x.k, x.v, scale=x.scale, select=select)
                plain = ref.attention_ref(x.q, x.k, x.v, scale=x.scale, select=select, upcast=False)
            if select is None:
                got, want, plain = (got,), (want,), (plain,)
            for name, g, w, p in zip(("out", "maps"), got, want, plain):
                compare(name, g, w, p)
            return None

        out, loss = fn(x.q, x.k, x.v, x.k_ref, x.tokens, x.scale)
        results = {}
        for label, dtype_ in (("want", torch.float64), ("plain", dtype)):
            q, k, v, k_ref = leaves(dtype_)
            o, l = ref.subject_ref(q, k, v, k_ref, tokens=x.tokens, scale=x.scale,
                                   upcast=label == "want")
            d_out = torch.autograd.grad(o, (q, k, v), x.dout.to(dtype_), retain_graph=True)
            d_loss = torch.autograd.grad(l.sum(), (q, k))
            results[label] = (o, l, d_out, d_loss)
        want, plain = results["want"], results["plain"]
        compare("out", out, want[0], plain[0])
        d_out = torch.autograd.grad(out, (x.q, x.k, x.v), x.dout, retain_graph=True)
        for name, g, w, p in zip(("dq (from out)", "dk (from out)", "dv (from out)"), d_out, want[2], plain[2]):
            compare(name, g, w, p)
        if impl.is_floor:
            return None  # a floor computes no loss: only its output path is checked
        compare("loss", loss, want[1], plain[1])
        d_loss = torch.autograd.grad(loss.sum(), (x.q, x.k))
        for name, g, w, p in zip(("dq (from loss)", "dk (from loss)"), d_loss, want[3], plain[3]):
            compare(name, g, w, p)
        return None
    except AssertionError as exc:
        return f"wrong result: {exc}"
    except Exception as exc:  # noqa: BLE001 - any failure disqualifies the implementation
        return f"failed: {_short_error(exc)}"


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
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


def run_benchmarks(cases: List[XattnShape], batches: List[int], modes: List[str],
                   impls: List[Implementation], device: torch.device, dtype: torch.dtype, *,
                   budget_s: float, compile_budget_s: float, copy_gbs: Optional[float],
                   rep_ms: float = 100.0, show_progress: bool = True,
                   log=print) -> Tuple[List[Result], Dict[str, str]]:
    """Check every (implementation, mode) once, then time the good ones on every case.

    Returns the results and ``skipped``: "impl/mode" -> why it was not timed.
    """
    skipped: Dict[str, str] = {}
    runnable: List[Tuple[Implementation, str]] = []
    for impl in impls:
        try:
            reason = impl.unavailable(device, dtype)
        except Exception as exc:  # noqa: BLE001 - a broken probe makes the implementation unavailable
            reason = _short_error(exc)
        for mode in modes:
            if impl.function(mode) is None:
                continue
            key = f"{impl.name}/{mode}"
            if reason is None:
                t0 = time.perf_counter()
                problem = check_implementation(impl, mode, device, dtype)
                if problem is not None:
                    skipped[key] = f"REJECTED by the reference check: {problem}"
                    log(f"!! {key}: {skipped[key]}")
                    continue
                if impl.name == "eager_compiled":
                    compile_budget_s -= time.perf_counter() - t0
                runnable.append((impl, mode))
            else:
                skipped[key] = f"unavailable: {reason}"

    groups = [(case, batch, mode) for case in cases for batch in batches for mode in modes]
    results: List[Result] = []
    bar = progress(groups, desc="attn_speed", enabled=show_progress)
    try:
        _time_groups(bar, runnable, skipped, results, device, dtype, budget_s=budget_s,
                     compile_budget_s=compile_budget_s, copy_gbs=copy_gbs, rep_ms=rep_ms)
    except KeyboardInterrupt:  # Ctrl-C or `timeout` (SIGTERM, see main): keep what was measured
        log("interrupted: reporting the measurements taken so far")
        skipped["everything/remaining cases"] = "not run: interrupted"
    return results, skipped


def _time_groups(bar, runnable, skipped, results, device, dtype, *, budget_s, compile_budget_s,
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

        # First call of each: compiles / autotunes, and drops whatever fails on this case.
        calls: Dict[str, Tuple[Implementation, object]] = {}
        for impl, impl_mode in runnable:
            if impl_mode != mode:
                continue
            key = f"{impl.name}/{mode}"
            if impl.name == "eager_compiled" and compile_budget_s <= 0:
                skipped.setdefault(key + " (some cases)",
                                   "torch.compile time budget spent (--compile-budget-s)")
                continue
            call = mode_call(impl, mode, x)
            try:
                t0 = time.perf_counter()
                call()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if impl.name == "eager_compiled":
                    compile_budget_s -= time.perf_counter() - t0
                calls[impl.name] = (impl, call)
            except Exception as exc:  # noqa: BLE001 - one failing case must not end the run
                skipped[f"{key} {case.name} B={batch}"] = f"failed: {_short_error(exc)}"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if not calls:
            continue

        if device.type == "cuda":
            timings = {name: time_cuda(call, rep_ms=rep_ms) for name, (_, call) in calls.items()}
        else:
            timings = time_cpu_interleaved({n: c for n, (_, c) in calls.items()}, budget_s=budget_s)

        for name, (impl, call) in calls.items():
            saved = None
            if mode == "subject_fwd_bwd":
                with SavedBytes() as counter:  # counts at save time; the graph is dropped after
                    impl.subject(x.q, x.k, x.v, x.k_ref, x.tokens, x.scale)
                saved = counter.mib
            peak = peak_memory_mib(call, device)
            timing = timings[name]
            gbps = pct = None
            if device.type == "cuda":
                moved = traffic_bytes((batch, case.n_q, case.heads, case.head_dim), mode, dtype)
                gbps = moved / (timing.median_ms * 1e-3) / 1e9
                pct = 100 * gbps / copy_gbs if copy_gbs else None
            results.append(Result(case, name, mode, batch, timing.median_ms, timing.iqr_ms,
                                  saved, peak, gbps, pct))


# ------------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------------
def _fmt_ms(r: Optional[Result]) -> str:
    if r is None:
        return "-"
    return f"{r.ms_median:.3f}±{r.ms_iqr:.3f}" if r.ms_median < 1 else f"{r.ms_median:.2f}±{r.ms_iqr:.2f}"


def _table(header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def report(results: List[Result], skipped: Dict[str, str], impl_names: List[str], modes: List[str],
           device: torch.device) -> str:
    """Per mode: a table of times (and saved MiB / GB/s), then semfid's speedup over each baseline."""
    index = {(r.case.name, r.batch, r.mode, r.impl): r for r in results}
    groups = sorted({(r.case.name, r.batch) for r in results},
                    key=lambda g: ([s.name for s in SD_SHAPES].index(g[0]), g[1]))
    baselines = [n for n in impl_names if not n.startswith("semfid")]
    out: List[str] = []
    for mode in modes:
        names = [n for n in impl_names if any(k[2] == mode and k[3] == n for k in index)]
        if not names:
            continue
        def metric_table(title: str, cell: Callable[[Result], Optional[str]]) -> None:
            """One row per (case, batch), one column per implementation; '-' where missing."""
            rows = []
            for case, batch in groups:
                results_ = [index.get((case, batch, mode, n)) for n in names]
                rows.append([SHAPES_BY_NAME[case].label, str(batch)]
                            + [("-" if r is None else cell(r)) or "-" for r in results_])
            out.append(f"\n== {mode}: {title} ==")
            out.append(_table(["case", "B"] + names, rows))

        metric_table("time in ms (median ± IQR)", lambda r: _fmt_ms(r))
        if mode == "subject_fwd_bwd":
            metric_table("MiB kept for backward (saved tensors, storages deduplicated)",
                         lambda r: None if r.saved_mib is None else f"{r.saved_mib:.1f}")
        if device.type == "cuda":
            metric_table("achieved GB/s of the ideal traffic (% of copy bandwidth)",
                         lambda r: None if r.gbps is None else
                         f"{r.gbps:.0f} ({r.pct_copy:.0f}%)" if r.pct_copy else f"{r.gbps:.0f}")
            metric_table("peak extra GPU memory in MiB",
                         lambda r: None if r.peak_mib is None else f"{r.peak_mib:.1f}")

        shown = [b for b in baselines if b in names]
        if "semfid" in names and shown:
            rows = []
            for case, batch in groups:
                ours = index.get((case, batch, mode, "semfid"))
                row = [SHAPES_BY_NAME[case].label, str(batch)]
                for b in shown:
                    theirs = index.get((case, batch, mode, b))
                    row.append("-" if ours is None or theirs is None
                               else f"{theirs.ms_median / ours.ms_median:.2f}x")
                rows.append(row)
            out.append(f"\n== {mode}: speedup of semfid over each baseline (baseline ms / semfid ms; "
                       ">1 = semfid faster; sdpa_floor computes no maps/loss) ==")
            out.append(_table(["case", "B"] + shown, rows))

    target = [(c, b) for (c, b, m, n) in index if m == "subject_fwd_bwd" and n == "semfid"
              and (c, b, m, "eager") in index]
    if target:
        losing = [f"{c} B={b}: semfid {index[(c, b, 'subject_fwd_bwd', 'semfid')].ms_median:.2f} ms vs "
                  f"eager {index[(c, b, 'subject_fwd_bwd', 'eager')].ms_median:.2f} ms"
                  for (c, b) in sorted(target)
                  if index[(c, b, "subject_fwd_bwd", "semfid")].ms_median
                  > index[(c, b, "subject_fwd_bwd", "eager")].ms_median]
        verdict = "MET" if not losing else "NOT MET on " + "; ".join(losing)
        out.append(f"\ntarget: semfid subject_fwd_bwd at least as fast as eager on every case run: {verdict}")
    if skipped:
        out.append("\nnot timed:")
        by_reason: Dict[Tuple[str, str], List[str]] = {}
        for key, why in skipped.items():  # "impl/mode[ case]" -> one line per impl and reason
            impl, _, rest = key.partition("/")
            by_reason.setdefault((impl, why), []).append(rest)
        for (impl, why), what in sorted(by_reason.items()):
            out.append(f"  {impl} ({', '.join(sorted(what))}): {why}")
    return "\n".join(out)


def records(results: List[Result], device: torch.device, dtype: torch.dtype, env: dict) -> List[dict]:
    machine = env.get("gpu") or f"CPU: {env['cpu']} ({env['cpu_count']} cores)"
    recs = []
    for r in results:
        rec = {
            "case": r.case.name, "impl": r.impl, "mode": r.mode, "device": device.type,
            "dtype": str(dtype).replace("torch.", ""), "batch": r.batch,
            "ms_median": round(r.ms_median, 5), "ms_iqr": round(r.ms_iqr, 5),
            "saved_mib": None if r.saved_mib is None else round(r.saved_mib, 3),
            "peak_mib": None if r.peak_mib is None else round(r.peak_mib, 3),
            # beyond the fixed fields: context for readers of the file
            "case_label": r.case.label, "gbps": None if r.gbps is None else round(r.gbps, 1),
            "pct_copy_bandwidth": None if r.pct_copy is None else round(r.pct_copy, 1),
            "machine": machine, "date_utc": env["date_utc"], "torch": env["torch"],
            "load_avg_1m": env["load_avg_1m"],
        }
        recs.append(rec)
    return recs


def markdown(recs: List[dict]) -> str:
    """The records as a README-ready table per mode: ms (median) per implementation and semfid's
    speedup over eager, every number labelled with device, machine, date and load."""
    lines: List[str] = []
    first = recs[0] if recs else None
    if first is None:
        return ""
    machine = first["machine"] if first["device"] == "cpu" else f"GPU: {first['machine']}"
    label = (f"{machine}, {first['dtype']}, torch {first['torch']}, "
             f"{first['date_utc']}, load average {first.get('load_avg_1m')} at start")
    impls = list(dict.fromkeys(r["impl"] for r in recs))
    for mode in MODES:
        rows = [r for r in recs if r["mode"] == mode]
        if not rows:
            continue
        names = [n for n in impls if any(r["impl"] == n for r in rows)]
        idx = {(r["case"], r["batch"], r["impl"]): r for r in rows}
        keys = list(dict.fromkeys((r["case"], r["batch"]) for r in rows))
        lines += [f"\n**{mode}**, ms (median of a warmed-up loop; IQR in the JSON). {label}\n",
                  "| case | B | " + " | ".join(names) + " | semfid vs eager |",
                  "|---|---|" + "---|" * len(names) + "---|"]
        for case, batch in keys:
            cells = [f"{idx[(case, batch, n)]['ms_median']:.2f}" if (case, batch, n) in idx else "-"
                     for n in names]
            ours, eager = idx.get((case, batch, "semfid")), idx.get((case, batch, "eager"))
            ratio = f"{eager['ms_median'] / ours['ms_median']:.2f}x" if ours and eager else "-"
            lines.append(f"| {SHAPES_BY_NAME[case].label} | {batch} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def plot(results: List[Result], path: str, title: str) -> Optional[str]:
    """Grouped bar chart of semfid's speedup over each baseline; returns an error string or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    index = {(r.case.name, r.batch, r.mode, r.impl): r for r in results}
    groups = sorted({(r.case.name, r.batch, r.mode) for r in results if r.impl == "semfid"},
                    key=lambda g: (MODES.index(g[2]), [s.name for s in SD_SHAPES].index(g[0]), g[1]))
    baselines = sorted({r.impl for r in results if not r.impl.startswith("semfid")},
                       key=lambda n: [r.impl for r in results].index(n))
    if not groups or not baselines:
        return "nothing to plot (semfid or the baselines were not timed)"
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(groups) * max(1, len(baselines)) / 2), 5))
    width = 0.8 / len(baselines)
    for i, b in enumerate(baselines):
        xs, ys = [], []
        for j, g in enumerate(groups):
            theirs, ours = index.get(g + (b,)), index.get(g + ("semfid",))
            if theirs is not None and ours is not None:
                xs.append(j + (i - (len(baselines) - 1) / 2) * width)
                ys.append(theirs.ms_median / ours.ms_median)
        ax.bar(xs, ys, width, label=b)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{c} B{b}\n{m}" for c, b, m in groups], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speedup of semfid (baseline ms / semfid ms)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="CPU-sized run: batch 2, short time budget, no torch.compile (default on CPU)")
    size.add_argument("--full", action="store_true", help="every case even on a CPU")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="default: float16 on GPU, float32 on CPU")
    p.add_argument("--cases", nargs="+", choices=[s.name for s in SD_SHAPES], default=None)
    p.add_argument("--batch", nargs="+", type=int, default=None,
                   help=f"batch sizes (default: {GPU_BATCHES} on GPU, {QUICK_BATCHES} with --quick)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--impl", nargs="+", default=None,
                   help="implementations to run (default: all available)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="CPU: seconds per measurement (default 0.25 with --quick, 1.0 otherwise)")
    p.add_argument("--rep-ms", type=float, default=100.0,
                   help="GPU: milliseconds of timed repetitions per measurement (do_bench's rep)")
    p.add_argument("--compile-budget-s", type=float, default=180.0,
                   help="stop timing eager_compiled once its compilations took this long")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch.set_num_threads (default: torch's choice). On a machine shared "
                        "with other jobs, 1 thread avoids OpenMP barriers waiting on descheduled threads")
    p.add_argument("--json", default=None, help="write the records to this JSON file")
    p.add_argument("--plot", default=None, help="write a PNG bar chart of speedups here")
    p.add_argument("--markdown", default=None, help="write README-ready markdown tables here")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but this torch sees no CUDA GPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    quick = args.quick or (device.type != "cuda" and not args.full)
    notes = []
    if quick and not args.quick:
        notes.append("no GPU: running --quick (a CPU-sized subset; pass --full for every case)")

    cases = [SHAPES_BY_NAME[n] for n in (args.cases or (QUICK_CASES if quick else [s.name for s in SD_SHAPES]))]
    batches = args.batch or (QUICK_BATCHES if quick else GPU_BATCHES)
    budget_s = args.budget_s if args.budget_s is not None else (0.25 if quick else 1.0)

    impls = all_implementations()
    if args.impl is not None:
        unknown = sorted(set(args.impl) - {i.name for i in impls})
        if unknown:
            print(f"error: unknown or unavailable implementation(s) {unknown}; "
                  f"choices here: {[i.name for i in impls]}", file=sys.stderr)
            return 2
        impls = [i for i in impls if i.name in args.impl]
    elif quick:
        # torch.compile takes minutes on a small CPU; run it with --full or --impl eager_compiled.
        impls = [i for i in impls if i.name != "eager_compiled"]
        notes.append("--quick leaves out eager_compiled (compile time); name it with --impl to include it")

    # `timeout` sends SIGTERM: turn it into KeyboardInterrupt so the results so far are reported.
    previous_handler = signal.signal(signal.SIGTERM, _interrupt)
    env = environment(device)
    print("semfid attn_speed: cross-attention of SD1.5 (512 px) and SDXL (1024 px), 77 text tokens, "
          f"{NUM_MAP_TOKENS} map tokens")
    print(format_environment(env))
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"device {device}, dtype {str(dtype).replace('torch.', '')}, batches {batches}, "
          f"modes {args.modes}" + (f", copy bandwidth {copy_gbs:.0f} GB/s (measured now)" if copy_gbs else ""))
    for n in notes:
        print(f"note: {n}")
    sys.stdout.flush()

    t0 = time.perf_counter()
    results, skipped = run_benchmarks(
        cases, batches, args.modes, impls, device, dtype, budget_s=budget_s,
        compile_budget_s=args.compile_budget_s, copy_gbs=copy_gbs, rep_ms=args.rep_ms,
        show_progress=not args.no_progress)
    signal.signal(signal.SIGTERM, previous_handler)
    print(report(results, skipped, [i.name for i in impls], args.modes, device))
    print(f"\n{len(results)} measurements in {time.perf_counter() - t0:.1f} s")

    if args.json:
        with open(args.json, "w") as f:
            json.dump(records(results, device, dtype, env), f, indent=1)
        print(f"wrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(records(results, device, dtype, env)) + "\n")
        print(f"wrote {args.markdown}")
    if args.plot:
        where = env.get("gpu") or f"CPU {env['cpu']}"
        problem = plot(results, args.plot,
                       f"semfid speedup, {where}, {str(dtype).replace('torch.', '')}, {env['date_utc']}")
        print(f"plot not written: {problem}" if problem else f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
