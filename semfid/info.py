"""``python -m semfid.info``: versions, backends (usable or not, and why), and which backend runs a tensor.

Flags (each imports its tool only when given):
  --compile-check    compile every Triton kernel configuration for sm_80 and sm_90 (no GPU needed)
                     and print registers / spills / shared memory; exits non-zero on any failure.
  --cuda-resources   print the registers / spills / shared memory of the built CUDA kernels.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from typing import List, Optional

import torch

import semfid
from semfid._inputs import SubjectInputs, XattnInputs
from semfid.backends import ENV_VAR, registered_backends, select_backend

#: flag -> (module whose ``main(argv) -> int`` runs the tool, help); imported only when the flag is given
TOOLS = {
    "--compile-check": ("semfid.kernels.compile_check",
                        "compile every Triton kernel config for sm_80/sm_90 and report resources"),
    # csrc/resources.py: a CI tool beside the CUDA sources, importable from the repository root
    "--cuda-resources": ("csrc.resources", "registers/spills/shared memory of the built CUDA kernels"),
}

PROBE = "SD1.5 fp16 layer, 8x40 heads, 77 keys, 10 selected tokens"


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as exc:  # any import failure is a status, not a crash
        return f"not available ({type(exc).__name__})"


def _probes(device: str) -> dict:
    """Typical SD1.5 inputs of each op (fp16, 8 heads x 40, 77 keys, 10 tokens), by public function."""
    def t(n: int) -> torch.Tensor:
        return torch.zeros(1, 8, n, 40, dtype=torch.float16, device=device)

    tokens = list(range(10))
    return {"cross_attention": XattnInputs.validate(t(4), t(77), t(77), select=tokens),
            "subject_attention": SubjectInputs.validate(t(4), t(77), t(77), t(77), tokens=tokens)}


def _devices() -> List[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def versions() -> List[str]:
    """semfid, Python, torch and the optional packages; the GPUs; the CUDA extension; the CPU core."""
    from semfid._install_check import install_problem

    problem = install_problem(semfid.__file__)
    lines = [f"semfid {semfid.__version__}" + (f"  (WARNING: {problem})" if problem else ""),
             f"python {platform.python_version()} on {platform.platform()}",
             f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"]
    lines += [f"{mod} {_version(mod)}" for mod in ("triton", "diffusers", "transformers", "xformers")]
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        p = torch.cuda.get_device_properties(i)
        lines.append(f"GPU {i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    if not torch.cuda.is_available():
        lines.append("GPU: none visible")
    try:
        from semfid import _cpp_lib

        lines.append(f"CUDA extension semfid._C: {_cpp_lib.status()}")
    except ImportError:
        lines.append("CUDA extension semfid._C: not part of this build")
    from semfid import _cpu_core

    lines.append(f"C++ CPU core semfid._cpu_ops (the torch backend's subject op on CPU): "
                 f"{_cpu_core.status()}")
    from semfid.backends import gemm_attention

    reason = gemm_attention.onednn_reason()
    lines.append("joint-path float32 CPU products (semfid.backends.gemm_attention): "
                 + ("oneDNN matmul (checked against torch.mm)" if reason is None else f"torch.mm ({reason})"))
    return lines


def backends() -> List[str]:
    """Every registered backend: usable or why not, what it supports, whether it takes the probe."""
    lines = [f"backends (auto tries them top to bottom; probe: {PROBE}):"]
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
        for dev in _devices():
            for op, inp in _probes(dev).items():
                reasons = b.not_supported_reasons(inp)
                verdict = "runs it" if not reasons else "cannot: " + "; ".join(reasons)
                lines.append(f"          {op} probe on {dev}: {verdict}")
            refusal = b.auto_refusal(torch.device(dev))
            lines.append(f"          auto may pick it on {dev}: {'yes' if refusal is None else 'no, ' + refusal}")
    return lines


def paths() -> List[str]:
    """The backend ``backend="auto"`` picks for each probe on the CPU and on a CUDA GPU."""
    lines = [f"backend='auto' picks, for the probes ({ENV_VAR}={os.environ.get(ENV_VAR, 'auto')}):"]
    for dev in ("cpu", "cuda"):
        if dev == "cuda" and not torch.cuda.is_available():
            lines.append("  cuda: no GPU visible here; " + _cuda_path_without_gpu())
            continue
        for op, inp in _probes(dev).items():
            try:
                lines.append(f"  {op} on {dev}: {select_backend(inp).NAME}")
            except ValueError as exc:
                lines.append(f"  {op} on {dev}: none ({str(exc).splitlines()[0]})")
    return lines


def _cuda_path_without_gpu() -> str:
    """What ``auto`` would do on a CUDA tensor, from the registry alone (no device to ask)."""
    ordered = registered_backends()
    validated = [b.NAME for b in ordered if "cuda" in b.AUTO_DEVICES and b.unavailable_reason() is None]
    first = validated[0] if validated else "none"
    gated = [b.NAME for b in ordered if b.SELF_VALIDATED and b.unavailable_reason() is None
             and (not validated or b.PRIORITY < next(x.PRIORITY for x in ordered if x.NAME == first))]
    text = f"on a CUDA tensor auto takes {first!r} (validated on cuda by construction)"
    if gated:
        text += (f" unless {' / '.join(map(repr, gated))} passed semfid's self-test on that GPU "
                 f"(run once by itself on the first CUDA call unless SEMFID_SELFTEST=off, or "
                 f"`python -m semfid.selftest`; shipped verdicts count too)")
    return text


def report() -> str:
    """The whole ``python -m semfid.info`` text."""
    return "\n".join(versions() + [""] + backends() + [""] + paths())


def main(argv: Optional[List[str]] = None) -> int:
    from semfid._install_check import namespace_problem

    problem = namespace_problem(semfid)
    if problem:
        print(f"semfid.info: {problem}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="python -m semfid.info", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, (_, help_text) in TOOLS.items():
        parser.add_argument(flag, action="store_true", help=help_text)
    args, rest = parser.parse_known_args(argv)
    for flag, (module, _) in TOOLS.items():
        if getattr(args, flag.lstrip("-").replace("-", "_")):
            return importlib.import_module(module).main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
