"""``python -m semfid.info``: versions, backends (usable or not, and why), CUDA extension, GPU.

Flags:
  --compile-check    compile every Triton kernel configuration for sm_80 and sm_90 (no GPU needed)
                     and print registers / spills / shared memory; exits non-zero on any failure.
  --cuda-resources   print the registers / spills / shared memory of the built CUDA kernels.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from typing import List, Optional

import torch

import semfid
from semfid._inputs import XattnInputs
from semfid.backends import registered_backends


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as exc:  # any import failure is a status, not a crash
        return f"not available ({type(exc).__name__})"


def _probe(device: str) -> XattnInputs:
    """A typical SD1.5 cross-attention input: fp16, 8 heads x 40, 77 keys, 10 selected tokens."""
    def t(n: int) -> torch.Tensor:
        return torch.zeros(1, 8, n, 40, dtype=torch.float16, device=device)

    return XattnInputs.validate(t(4), t(77), t(77), select=list(range(10)))


def report() -> str:
    lines: List[str] = []
    lines.append(f"semfid {semfid.__version__}")
    lines.append(f"python {platform.python_version()} on {platform.platform()}")
    lines.append(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    for mod in ("triton", "diffusers", "transformers", "xformers"):
        lines.append(f"{mod} {_version(mod)}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("GPU: none visible")
    try:
        from semfid import _cpp_lib

        lines.append(f"CUDA extension semfid._C: {_cpp_lib.status()}")
    except ImportError:
        lines.append("CUDA extension semfid._C: not part of this build")
    lines.append("")
    lines.append("backends (auto tries them top to bottom; probe: SD1.5 fp16 8x40 heads, 77 keys):")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for b in registered_backends():
        missing = b.unavailable_reason()
        head = f"  {b.NAME:<7} priority {b.PRIORITY:<4} {'usable' if missing is None else 'unusable'}"
        lines.append(f"{head} — {b.status()}")
        dtypes = ", ".join(sorted(str(d).replace("torch.", "") for d in b.SUPPORTED_DTYPES))
        lines.append(f"          supports: {sorted(b.SUPPORTED_DEVICES)}; {dtypes}; max head dim "
                     f"{b.MAX_HEAD_DIM or 'any'}; max keys {b.MAX_KEYS or 'any'}; "
                     f"auto on: {sorted(b.AUTO_DEVICES) or 'none (opt-in)'}")
        if missing is not None:
            lines.append(f"          why unusable: {missing}")
            continue
        for dev in devices:
            reasons = b.not_supported_reasons(_probe(dev))
            verdict = "runs it" if not reasons else "cannot: " + "; ".join(reasons)
            lines.append(f"          SD1.5 fp16 probe on {dev}: {verdict}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m semfid.info", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile-check", action="store_true",
                        help="compile every Triton kernel config for sm_80/sm_90 and report resources")
    parser.add_argument("--cuda-resources", action="store_true",
                        help="registers/spills/shared memory of the built CUDA kernels")
    args, rest = parser.parse_known_args(argv)
    if args.compile_check:
        from semfid.kernels import compile_check  # imports triton only when asked

        return compile_check.main(rest)
    if args.cuda_resources:
        from semfid import _cuda_resources

        return _cuda_resources.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
