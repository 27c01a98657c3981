"""Launches and modelled bytes of one subject fwd+bwd per implementation, without any timing:
attn_speed's launch table on its own (``python benchmarks/attn_launch_table.py``)."""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench_utils import SD_SHAPES, SHAPES_BY_NAME, short_error  # noqa: E402
from attn_cases import make_inputs, mode_call  # noqa: E402
from attn_impls import all_implementations  # noqa: E402
from attn_launches import Observation, observe, triton_path  # noqa: E402
from attn_reports import TRITON_PATH, launch_rows, launch_table, triton_path_notes  # noqa: E402


def standalone_table(cases: List[str], batch: int, dtype: torch.dtype) -> str:
    """The launches / traffic table of attn_speed's report without any timing: every implementation
    that runs here eagerly, observed once per case on this machine's device, plus the Triton path
    (in-process on a GPU, in the interpreter child on a CPU)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seen: Dict[tuple, Observation] = {}
    names, notes = [], []
    for impl in all_implementations():
        if impl.subject is None or impl.compiles:
            continue
        reason = impl.unavailable(device, dtype)
        if reason is not None:
            notes.append(f"{impl.name}: unavailable: {reason}")
            continue
        names.append(impl.name)
        for name in cases:
            s = SHAPES_BY_NAME[name]
            x = make_inputs(batch, s.n_q, s.heads, s.head_dim, device, dtype)
            try:
                seen[(name, batch, impl.name)] = observe(mode_call(impl, "subject_fwd_bwd", x))
            except Exception as exc:  # noqa: BLE001 - one failure is a note, not the end
                notes.append(f"{impl.name} {name}: failed: {short_error(exc)}")
    path = {batch: triton_path(cases, batch, dtype)} if device.type == "cpu" else None
    if path and "error" not in path[batch]:
        names.append(TRITON_PATH)
        for name, got in path[batch]["cases"].items():
            seen[(name, batch, TRITON_PATH)] = Observation(Counter(got["kernels"]), got["bytes"])

    def observed(case, b, name):
        o = seen.get((case, b, name))
        return (None, None) if o is None else (o.launches, o.bytes)

    rows = launch_rows([(c, batch) for c in cases], names, dtype, observed)
    return launch_table(rows, names, dtype, notes + triton_path_notes(path))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="launches and modelled bytes of one subject fwd+bwd")
    p.add_argument("--cases", nargs="+", choices=[s.name for s in SD_SHAPES], default=["sd15_64", "sdxl_64"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    args = p.parse_args(argv)
    print(standalone_table(args.cases, args.batch, getattr(torch, args.dtype)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
