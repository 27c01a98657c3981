"""Per-kernel resources of the built CUDA extension: ``python -m semfid.info --cuda-resources``
(run from the repository root: this CI tool lives beside the sources it checks, not in the package).

Two checks that need no GPU:

* the ptxas report recorded at build time (``semfid/_cuda_resources.json``, written by
  ``csrc/build_config.py`` from ``-Xptxas -v``): registers, spill stores/loads and stack per kernel
  and arch, plus the dynamic shared memory each block asks for (from ``semfid_C::smem_bytes`` when the
  extension loads);
* ``--sass``: the disassembly of ``semfid/_C*.so`` (``cuobjdump -sass``), counting the tensor-core
  instructions (HMMA) per kernel and arch: every attention kernel must use them.

``RESOURCES_FILE`` and :func:`find_cuda_tool` are the one definition the build (``build_config.py``)
uses too.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

#: The ptxas report's file name, next to the built extension in the ``semfid`` package.
RESOURCES_FILE = "_cuda_resources.json"
_NAME = re.compile(r"((?:xattn|subject)_\w+?_kernel)(?:<(?:semfid::Xattn_kernel_traits<(\d+)>, )?(__half|__nv_bfloat16)>)?")
_MANGLED = re.compile(r"((?:xattn|subject)_\w+?_kernel)(?:I(?:NS_19Xattn_kernel_traitsILi(\d+)EEE)?(6__half|13__nv_bfloat16))?")
_DTYPES = {"__half": "fp16", "6__half": "fp16", "__nv_bfloat16": "bf16", "13__nv_bfloat16": "bf16"}
# kernel -> the semfid_C::smem_bytes kind of its largest configuration
_SMEM_KIND = {"xattn_fwd_kernel": "subject_fwd", "xattn_bwd_dq_kernel": "xattn_bwd_dq",
              "subject_bwd_dq_kernel": "subject_bwd_dq", "xattn_bwd_dkdv_kernel": "bwd_dkdv"}
# kernels without tensor-core work (reductions)
_NO_MMA = ("xattn_bwd_reduce_kernel", "xattn_loss_reduce_kernel")


def report_path() -> str:
    """Where the build wrote the report: beside the ``semfid`` package that Python imports."""
    spec = importlib.util.find_spec("semfid")
    package_dir = list(spec.submodule_search_locations)[0] if spec is not None else "semfid"
    return os.path.join(package_dir, RESOURCES_FILE)


def extension_path() -> Optional[str]:
    """File of the built extension ``semfid._C`` (found without importing it), or None."""
    spec = importlib.util.find_spec("semfid._C")
    return spec.origin if spec is not None else None


def load_report() -> Optional[dict]:
    try:
        with open(report_path()) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def kernel_label(name: str) -> Tuple[str, Optional[int], str]:
    """(kernel, head dim or None, dtype) from a demangled or mangled kernel name."""
    m = (_NAME if "<" in name or "::" in name else _MANGLED).search(name)
    if m is None:
        return name, None, "?"
    return m.group(1), int(m.group(2)) if m.group(2) else None, _DTYPES.get(m.group(3), m.group(3) or "-")


def _smem_bytes(kernel: str, head_dim: Optional[int], num_keys: int) -> Optional[int]:
    """Dynamic shared memory of one block for num_keys keys and as many selected tokens."""
    kind = _SMEM_KIND.get(kernel)
    if kind is None or head_dim is None:
        return 0 if kernel in _NO_MMA else None
    from semfid import _cpp_lib

    if not _cpp_lib.is_built():
        return None
    import torch

    return int(torch.ops.semfid_C.smem_bytes(kind, head_dim, num_keys, num_keys))


def resource_rows(report: dict) -> List[Dict[str, object]]:
    rows = []
    for k in report.get("kernels", []):
        kernel, head_dim, dtype = kernel_label(str(k.get("name") or k["kernel"]))
        rows.append({
            "kernel": kernel, "head_dim": head_dim, "dtype": dtype, "arch": k["arch"],
            "registers": k["registers"], "spill_stores": k["spill_stores"], "spill_loads": k["spill_loads"],
            "stack_bytes": k["stack_bytes"], "static_smem_bytes": k["static_smem_bytes"],
            "dyn_smem_m77": _smem_bytes(kernel, head_dim, 77), "dyn_smem_m128": _smem_bytes(kernel, head_dim, 128),
        })
    rows.sort(key=lambda r: (str(r["kernel"]), r["head_dim"] or 0, str(r["dtype"]), str(r["arch"])))
    return rows


def find_cuda_tool(name: str) -> Optional[str]:
    """A CUDA binary tool (cuobjdump, nvdisasm, ptxas) from PATH, the CUDA toolkit (CUDA_HOME,
    CUDA_PATH, /usr/local/cuda) or the copy bundled with Triton (a torch dependency), or None."""
    found = shutil.which(name)
    if found:
        return found
    candidates = [os.path.join(home, "bin", name)
                  for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda") if home]
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.origin:
        candidates.append(os.path.join(os.path.dirname(triton.origin), "backends", "nvidia", "bin", name))
    return next((c for c in candidates if os.path.exists(c)), None)


def hmma_counts(so_path: str) -> Dict[Tuple[str, str], int]:
    """{(mangled kernel, sm_XX): number of HMMA instructions} from ``cuobjdump -sass``."""
    cuobjdump = find_cuda_tool("cuobjdump")
    if cuobjdump is None:
        raise FileNotFoundError("cuobjdump not found (put the CUDA toolkit's bin/ on PATH, set CUDA_HOME, "
                                "or install triton, which bundles it)")
    sass = subprocess.run([cuobjdump, "-sass", so_path], capture_output=True, text=True, check=True).stdout
    counts: Dict[Tuple[str, str], int] = {}
    arch, function = "?", None
    for line in sass.splitlines():
        m = re.search(r"code for (sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.search(r"Function : (\S+)", line)
        if m:
            function = m.group(1)
            counts.setdefault((function, arch), 0)
            continue
        if function is not None and re.search(r"\bHMMA\.", line):
            counts[(function, arch)] += 1
    return counts


def _fmt(value: object) -> str:
    return "-" if value is None else str(value)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m semfid.info --cuda-resources", description=__doc__.splitlines()[0])
    parser.add_argument("--sass", action="store_true", help="also count HMMA instructions with cuobjdump -sass")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)

    report = load_report()
    if report is None:
        print(f"no CUDA resource report at {report_path()}: the extension semfid._C was not built here "
              "(SEMFID_BUILD_CUDA=1 pip install --no-build-isolation .)")
        return 1
    rows = resource_rows(report)
    if args.sass:
        so = extension_path()
        if so is None:
            print("semfid._C is not built: no SASS to inspect")
            return 1
        counts = hmma_counts(so)
        by_label = {}
        for (function, arch), n in counts.items():
            kernel, head_dim, dtype = kernel_label(function)
            by_label[(kernel, head_dim, dtype, arch)] = n
        for r in rows:
            r["hmma"] = by_label.get((r["kernel"], r["head_dim"], r["dtype"], r["arch"]))
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0

    print(f"semfid._C kernels (archs {';'.join(report.get('archs', []))}, built in "
          f"{report.get('build_minutes', '?')} min; {report.get('note', '')})")
    columns = ["kernel", "head_dim", "dtype", "arch", "registers", "spill_stores", "spill_loads",
               "stack_bytes", "dyn_smem_m77", "dyn_smem_m128"] + (["hmma"] if args.sass else [])
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) if rows else len(c) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))
    spilling = [r for r in rows if (r["spill_stores"] or 0) + (r["spill_loads"] or 0) > 0]
    print(f"{len(rows)} kernels; {len(spilling)} with spills"
          + (": " + ", ".join(f"{r['kernel']}/hdim{r['head_dim']}/{r['dtype']}/{r['arch']}" for r in spilling)
             if spilling else ""))
    if args.sass:
        missing = [r for r in rows if r["kernel"] not in _NO_MMA and not r.get("hmma")]
        print("HMMA check: " + ("every attention kernel uses tensor cores" if not missing else
                                "NO HMMA in " + ", ".join(f"{r['kernel']}/hdim{r['head_dim']}/{r['arch']}" for r in missing)))
        return 1 if missing else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
