"""How fast is semfid on the cross-attention shapes of Stable Diffusion, against what people use today?

Runs every semfid backend available here and the baselines of ``benchmarks/baselines.py`` on every
distinct cross-attention shape of SD1.5 (512 px) and SDXL (1024 px), in three modes:

* ``forward``          attention output only;
* ``forward_maps``     output + head-mean maps of 10 tokens (inference-time map capture);
* ``subject_fwd_bwd``  output + SeFi-IDE subject loss, forward and backward (training).

Each implementation is first checked against the float64 reference on a small case, on the device
and dtype of the run; a wrong one is reported and skipped, never timed. For the subject loss the
report also gives the kernel launches of one forward+backward and the modelled bytes moved against
the compulsory bytes, for semfid and every eager baseline, and, on a CPU, for semfid's Triton path
(observed under the Triton interpreter in a child process). The machine's load average is printed
at the start and at the end.

The modules: ``attn_cases`` (inputs, one call per mode), ``attn_impls`` + ``baselines`` (what is
timed; a compiled baseline declares its compile budget), ``attn_gate`` (the reference check),
``attn_timing`` (the run), ``attn_traffic`` + ``attn_launches`` (bytes and launches), ``attn_reports``.

    python benchmarks/attn_speed.py                 # GPU: every case at batch 2 and 8; CPU: --quick
    python benchmarks/attn_speed.py --quick --json results.json --plot speedup.png
    python benchmarks/attn_speed.py --cases sd15_64 --modes subject_fwd_bwd --impl semfid eager

Then the diffusion-transformer cases (:mod:`attn_dit`: Flux, SD3 and PixArt-Σ layers, the subject
loss over joint key sets, at 512 px with ``--quick`` / on a CPU, 1024 px on a GPU), unless
``--cases`` / ``--impl`` name SD cases or implementations or ``--no-dit`` is given; ``--dit-only``
runs only them).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

# The pieces, one job per module: cases (inputs and one call per mode), implementations (semfid's
# public ops and the baselines), the reference gate, timing, traffic and launches, reports.
from _bench_utils import (  # noqa: E402
    SD_SHAPES, SHAPES_BY_NAME, copy_bandwidth_gbs, environment, format_environment, load_average,
)
from attn_cases import GPU_BATCHES, NUM_MAP_TOKENS, QUICK_BATCHES, QUICK_CASES  # noqa: E402
from attn_gate import check_implementation  # noqa: E402,F401  (re-exported for the tests)
from attn_impls import all_implementations, semfid_implementation  # noqa: E402,F401
from attn_launches import triton_path  # noqa: E402
from attn_reports import RECORD_FIELDS, markdown, plot, records, report  # noqa: E402,F401
from attn_timing import run_benchmarks  # noqa: E402
from baselines import MODES  # noqa: E402


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
    p.add_argument("--compile-budget-s", type=float, default=None,
                   help="stop timing an implementation that compiles (eager_compiled, flex_attention) "
                        "once its compilations took this long (default: each one's own budget, 180 s)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch.set_num_threads (default: torch's choice). On a machine shared "
                        "with other jobs, 1 thread avoids OpenMP barriers waiting on descheduled threads")
    p.add_argument("--json", default=None, help="write the records to this JSON file")
    p.add_argument("--plot", default=None, help="write a PNG bar chart of speedups here")
    p.add_argument("--markdown", default=None, help="write README-ready markdown tables here")
    p.add_argument("--no-progress", action="store_true")
    dit = p.add_mutually_exclusive_group()
    dit.add_argument("--no-dit", action="store_true", help="skip the diffusion-transformer cases")
    dit.add_argument("--dit-only", action="store_true", help="run only the diffusion-transformer cases")
    return p.parse_args(argv)


def run_dit(device: torch.device, dtype: torch.dtype, quick: bool, budget_s: float) -> None:
    """The DiT section (attn_dit): subject fwd+bwd over joint key sets, interleaved on a CPU."""
    import attn_dit

    t0 = time.perf_counter()
    px = 512 if quick or device.type != "cuda" else 1024
    print(f"\nDiT cases (attn_dit): {load_average()}")
    print("\n".join(attn_dit.run(attn_dit.DIT_CASES, px, device, dtype, budget_s=budget_s)))
    print(f"DiT cases in {time.perf_counter() - t0:.1f} s; {load_average()} at the end")


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
        # torch.compile takes minutes on a small CPU; run those with --full or name them with --impl.
        compiled = [i.name for i in impls if i.compiles]
        impls = [i for i in impls if not i.compiles]
        if compiled:
            notes.append(f"--quick leaves out {', '.join(compiled)} (compile time); "
                         "name them with --impl to include them")

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

    if args.dit_only:
        run_dit(device, dtype, quick, budget_s)
        return 0
    t0 = time.perf_counter()
    results, skipped = run_benchmarks(
        cases, batches, args.modes, impls, device, dtype, budget_s=budget_s,
        compile_budget_s=args.compile_budget_s, copy_gbs=copy_gbs, rep_ms=args.rep_ms,
        show_progress=not args.no_progress)
    path = None
    if device.type == "cpu" and "subject_fwd_bwd" in args.modes and any(
            i.name.startswith("semfid") for i in impls):
        # the Triton path (what a GPU runs) observed in a TRITON_INTERPRET=1 child
        path = {b: triton_path([c.name for c in cases], b, dtype) for b in batches}
    signal.signal(signal.SIGTERM, previous_handler)
    print(report(results, skipped, [i.name for i in impls], args.modes, device, dtype, path))
    print(f"\n{len(results)} measurements in {time.perf_counter() - t0:.1f} s; {load_average()} at the end")
    if not args.no_dit and args.cases is None and args.impl is None:
        run_dit(device, dtype, quick, budget_s)

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
