"""attn_speed's reports: text tables, JSON records, README markdown and a speedup plot.

The text report has, per mode, a table of times (and saved MiB, GB/s, peak memory where measured),
semfid's speedup over each baseline, and for ``subject_fwd_bwd`` the kernel launches of one call
and the modelled bytes moved against the compulsory bytes (:mod:`attn_traffic`).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from _bench_utils import SD_SHAPES, SHAPES_BY_NAME
from attn_timing import Result
from attn_traffic import compulsory_bytes
from baselines import MODES

RECORD_FIELDS = ("case", "impl", "mode", "device", "dtype", "batch", "ms_median", "ms_iqr",
                 "saved_mib", "peak_mib")
TRITON_PATH = "semfid_triton_path"  # column of the Triton path observed under the interpreter
MB = 1e6


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
           device: torch.device, dtype: torch.dtype, triton_path: Optional[Dict[int, dict]] = None) -> str:
    """Per mode: a table of times (and saved MiB / GB/s), then semfid's speedup over each baseline;
    for subject_fwd_bwd also launches and traffic (``triton_path``: batch -> the interpreter child's
    result, see :func:`attn_launches.triton_path`)."""
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
        if mode == "subject_fwd_bwd":
            out.append(_traffic_section(index, groups, names, dtype, triton_path))

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
            "launches": r.launches, "moved_bytes": r.moved_bytes,
            "compulsory_bytes": compulsory_bytes((r.batch, r.case.n_q, r.case.heads, r.case.head_dim),
                                                 r.mode, dtype),
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
# launches and traffic
# ------------------------------------------------------------------------------------------------
def _launch_cell(launches: Optional[int], moved: Optional[int], ideal: int) -> str:
    if launches is None or moved is None:
        return "-"
    return f"{launches} / {moved / MB:.1f} ({moved / ideal:.2f}x)"


def launch_rows(groups: List[Tuple[str, int]], names: List[str], dtype: torch.dtype,
                observed: Callable[[str, int, str], Tuple[Optional[int], Optional[int]]]) -> List[List[str]]:
    """One row per (case, batch): compulsory MB, then "launches / MB (x compulsory)" per name;
    ``observed(case, batch, name)`` gives (launches, bytes) or (None, None)."""
    rows = []
    for case, batch in groups:
        s = SHAPES_BY_NAME[case]
        ideal = compulsory_bytes((batch, s.n_q, s.heads, s.head_dim), "subject_fwd_bwd", dtype)
        rows.append([s.label, str(batch), f"{ideal / MB:.1f}"]
                    + [_launch_cell(*observed(case, batch, n), ideal) for n in names])
    return rows


def launch_table(rows: List[List[str]], names: List[str], dtype: torch.dtype, notes: List[str]) -> str:
    title = (f"\n== subject_fwd_bwd: kernel launches of one call / modelled MB moved (x the compulsory "
             f"MB), {str(dtype).replace('torch.', '')} ==")
    return "\n".join([title, _table(["case", "B", "compulsory MB"] + names, rows)] + notes)


def triton_path_notes(triton_path: Optional[Dict[int, dict]]) -> List[str]:
    """What the Triton path column means, its kernels, or why it is missing."""
    if not triton_path:
        return []
    first = next(iter(triton_path.values()))
    if "error" in first:
        return [f"{TRITON_PATH}: not observed: {first['error']}"]
    kernels = ", ".join(f"{k} x{n}" for k, n in sorted(first["kernels"].items()))
    notes = [f"{TRITON_PATH}: semfid backend='triton' under TRITON_INTERPRET=1 (the path a GPU runs); "
             f"on a tiny shape with the kernels interpreted: {first['launches']} launches ({kernels}); "
             "per case: the kernels recorded, not run"]
    if first.get("recording_changes_count"):
        notes.append(f"WARNING: {TRITON_PATH}: recording instead of running the kernels changed the "
                     "launch count on the tiny shape")
    return notes


def _traffic_section(index, groups, names, dtype, triton_path) -> str:
    counted = [n for n in names if any(r.launches is not None for k, r in index.items()
                                       if k[3] == n and k[2] == "subject_fwd_bwd")]
    notes = ["launches: dispatched aten ops that launch a kernel + Triton / CUDA-extension kernels "
             "(TorchDispatchMode); not counted for compiled implementations (generated kernels)"]
    columns = list(counted)
    if triton_path and "error" not in next(iter(triton_path.values())):
        columns.append(TRITON_PATH)
    notes += triton_path_notes(triton_path)

    def observed(case, batch, name):
        if name == TRITON_PATH:
            got = (triton_path.get(batch) or {}).get("cases", {}).get(case)
            return (None, None) if got is None else (got["launches"], got["bytes"])
        r = index.get((case, batch, "subject_fwd_bwd", name))
        return (None, None) if r is None else (r.launches, r.moved_bytes)

    return launch_table(launch_rows(groups, columns, dtype, observed), columns, dtype, notes)
