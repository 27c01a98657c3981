"""The results part of gpu_check.sh's summary, from the JSON files the steps wrote.

    python benchmarks/gpu_check_summary.py OUT_DIR

Per case of ``attn_speed.json`` (subject fwd+bwd): semfid's time, achieved bandwidth, kernel launches
and modelled bytes against the compulsory bytes, and each baseline's time with semfid's speedup over
it; then ``train_step.json``'s step times and the loss cost over the floor. Missing files are skipped.
"""

from __future__ import annotations

import json
import os
import sys
from typing import List

BASELINES = ("eager", "sdpa_augmented_v", "xformers", "flex_attention", "eager_compiled", "sdpa_floor")


def attn_lines(recs: List[dict]) -> List[str]:
    idx = {(r["case"], r["batch"], r["mode"], r["impl"]): r for r in recs}
    others = [b for b in BASELINES if any(k[3] == b for k in idx)]
    load = recs[0].get("load_avg_1m") if recs else None
    lines = [f"\nattn_speed, subject_fwd_bwd, ms (semfid speedup over the baseline); load average {load} at start:",
             f"  {'case':8} {'B':>2} {'semfid':>9} {'GB/s (%copy)':>13} {'launches':>8} {'MB/compulsory':>13} "
             + " ".join(f"{o:>22}" for o in others)]
    for (case, batch, mode, impl), r in sorted(idx.items()):
        if mode != "subject_fwd_bwd" or impl != "semfid":
            continue
        cells = []
        for o in others:
            t = idx.get((case, batch, mode, o))
            cells.append("-" if t is None else f"{t['ms_median']:.3f} ({t['ms_median'] / r['ms_median']:.2f}x)")
        bw = "-" if r.get("gbps") is None else f"{r['gbps']:.0f} ({r.get('pct_copy_bandwidth') or 0:.0f}%)"
        moved, ideal = r.get("moved_bytes"), r.get("compulsory_bytes")
        ratio = "-" if not moved or not ideal else f"{moved / ideal:.2f}x"
        launches = "-" if r.get("launches") is None else str(r["launches"])
        lines.append(f"  {case:8} {batch:>2} {r['ms_median']:>9.3f} {bw:>13} {launches:>8} {ratio:>13} "
                     + " ".join(f"{c:>22}" for c in cells))
    if len(lines) == 2:
        modes = sorted({r["mode"] for r in recs})
        lines.append(f"  (no semfid subject_fwd_bwd record; {len(recs)} records of modes {modes})")
    return lines


def train_lines(rows: List[dict]) -> List[str]:
    lines = ["\ntrain_step (ms per step, loss cost over the no-loss floor):"]
    for r in rows:
        over = r.get("overhead_vs_floor_pct")
        compiled = f" compile={r['compile']} recompiles={r['recompiles']}" if r.get("compile") else ""
        lines.append(f"  {r['model']:5} {r['res']:>5}px B={r['batch']} {r['variant']:9} {r['ms_median']:9.1f} ms  "
                     f"peak {r.get('peak_mib') or 0:8.0f} MiB  "
                     + ("" if over is None or r["variant"] == "floor" else f"{over:+.1f}%") + compiled)
    return lines


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = args[0] if args else "gpu_check_out"
    lines: List[str] = []
    path = os.path.join(out, "attn_speed.json")
    if os.path.exists(path):
        with open(path) as f:
            lines += attn_lines(json.load(f))
    path = os.path.join(out, "train_step.json")
    if os.path.exists(path):
        with open(path) as f:
            lines += train_lines(json.load(f))
    if not lines:
        lines.append("\nno results (no attn_speed.json or train_step.json in " + out + ")")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
