"""``python -m semfid.selftest``: validate semfid's kernel backends on this GPU and cache the verdict.

Usage::

    python -m semfid.selftest [--backend triton|cuda|sdpa|all] [--device cuda:0] [--quick]
                              [--ship PATH] [--verbose]

Runs the battery (:mod:`semfid.selftest.battery`) in child processes, prints a summary and the
failing cases, stores the verdict in the per-user cache (``SEMFID_CACHE_DIR``) and, with
``--ship PATH``, also writes it to PATH (a file, or a directory: ``<backend>-<gpu>.json``) for
``semfid/verdicts/``. Exit status: 0 all passed, 1 a backend failed, 2 nothing could run.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import List, Optional

import torch

from . import cache
from .runner import import_backend, run_selftest

KERNEL_BACKENDS = ("triton", "cuda")


def _ship_path(target: Path, record: dict) -> Path:
    if target.suffix == ".json":
        return target
    gpu = re.sub(r"[^a-z0-9]+", "-", record["key"]["device"].lower()).strip("-")
    return target / f"{record['key']['backend']}-{gpu}-{record['key']['capability']}.json"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m semfid.selftest", description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="all",
                        help="triton, cuda, sdpa, any registered name, or all (triton and cuda)")
    parser.add_argument("--device", default=None, help="default: cuda:<current> when a GPU is visible, else cpu")
    parser.add_argument("--quick", action="store_true", help="the small battery (interpreter / CPU)")
    parser.add_argument("--ship", type=Path, help="also write the verdict file here")
    parser.add_argument("--backend-module", help="module:Class of an extra backend (tests)")
    parser.add_argument("--verbose", action="store_true", help="print every case")
    args = parser.parse_args(argv)

    from ..backends import get_backend

    if args.backend_module:
        import_backend(args.backend_module)
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    names = list(KERNEL_BACKENDS) if args.backend == "all" else [args.backend]
    status, ran = 0, 0
    for name in names:
        cls = get_backend(name)
        missing = cls.unavailable_reason()
        if missing is not None:
            print(f"{name}: not run ({missing})")
            continue
        record = run_selftest(cls, device, quick=args.quick or None, verbose=args.verbose)
        ran += 1
        key = record["key"]
        print(f"{name}: {'PASSED' if record['passed'] else 'FAILED'} on {key['device']} "
              f"({key['capability']}), {record['passed_cases']} cases passed, "
              f"{len(record['skipped'])} skipped, {record['seconds']:.0f} s ({record['battery']} battery)")
        for failure in record["failures"]:
            print(f"  FAIL {failure}")
        try:
            print(f"  verdict cached in {cache.save_cached(record)}")
        except cache.CacheUnusable as exc:
            print(f"  verdict not cached: {exc}")
        if args.ship:
            path = _ship_path(args.ship, record)
            cache.write_json(path, record)
            print(f"  verdict file written to {path}")
        if not record["passed"]:
            status = 1
    return status if ran else 2


if __name__ == "__main__":
    sys.exit(main())
