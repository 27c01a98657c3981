"""Decide whether and how ``setup.py`` builds the CUDA extension ``semfid._C`` from ``csrc/``.

Kept beside the CUDA sources so ``setup.py`` stays a list of switches (documented there):
SEMFID_BUILD_CUDA (auto / 1 / 0), SEMFID_CUDA_ARCHS (default "80;90", "90a" allowed), MAX_JOBS,
NVCC_THREADS.

The build compiles every ``csrc/instantiations/*.cu`` with ``-Xptxas -v``; the ptxas report (registers,
spills, stack per kernel and arch) is parsed into ``semfid/_cuda_resources.json`` next to the built
extension, which ``python -m semfid.info --cuda-resources`` (``csrc/resources.py``) prints.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

from .resources import RESOURCES_FILE

DEFAULT_ARCHS = "80;90"
# Memory one nvcc job may take: the instantiations include no torch headers (~0.5 GB each); the one
# file that does (semfid_api.cpp) takes ~1.5 GB.
_GB_PER_JOB = 2.0


def _say(message: str) -> None:
    print(f"semfid: {message}", flush=True)


def build_mode(variable: str = "SEMFID_BUILD_CUDA") -> str:
    """The value of an auto / 1 / 0 build switch (SEMFID_BUILD_CUDA, SEMFID_BUILD_CPU)."""
    mode = os.environ.get(variable, "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"{variable} must be auto, 0 or 1, got {mode!r}")
    return mode


def _archs() -> List[str]:
    """SEMFID_CUDA_ARCHS as a list like ["80", "90"]; the kernels use mma.sync, so sm_80 or newer."""
    raw = os.environ.get("SEMFID_CUDA_ARCHS", DEFAULT_ARCHS)
    archs = [a.strip().lower().replace("sm_", "").replace(".", "") for a in re.split(r"[;, ]+", raw) if a.strip()]
    for arch in archs:
        match = re.fullmatch(r"(\d+)(a|f)?", arch)
        if match is None or int(match.group(1)) < 80:
            raise SystemExit(
                f"SEMFID_CUDA_ARCHS must list compute capabilities >= 80 separated by ';' "
                f"(e.g. '80;90' or '90a'), got {raw!r}"
            )
    if not archs:
        raise SystemExit(f"SEMFID_CUDA_ARCHS is empty; use e.g. {DEFAULT_ARCHS!r}")
    return archs


def _gencode_flags(archs: List[str]) -> List[str]:
    """SASS for every arch, plus PTX of the last one so newer GPUs can JIT-compile the kernels."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    last = archs[-1]
    flags.append(f"-gencode=arch=compute_{last},code=compute_{last}")
    return flags


def _free_memory_gb() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024 ** 2
    except OSError:
        pass
    return None


def _nvcc_threads() -> int:
    raw = os.environ.get("NVCC_THREADS", "2")
    if not raw.isdigit() or int(raw) < 1:
        raise SystemExit(f"NVCC_THREADS must be a positive integer, got {raw!r}")
    return int(raw)


def _set_max_jobs(nvcc_threads: int) -> None:
    """MAX_JOBS from free memory and cores, unless the user set it (torch's ninja build reads it)."""
    if os.environ.get("MAX_JOBS"):
        return
    cores = os.cpu_count() or 1
    jobs = max(1, cores // nvcc_threads)
    free = _free_memory_gb()
    if free is not None:
        jobs = max(1, min(jobs, int(free / (_GB_PER_JOB * nvcc_threads))))
    os.environ["MAX_JOBS"] = str(jobs)
    _say(f"MAX_JOBS={jobs} (cores={cores}, free memory={free if free is None else round(free, 1)} GB, "
         f"NVCC_THREADS={nvcc_threads})")


def _skip_reason() -> Tuple[Optional[str], Optional[str]]:
    """(reason the CUDA build cannot run or None, nvcc path)."""
    try:
        import torch
    except ImportError:
        return ("torch is not importable in the build environment "
                "(install torch first and build with pip install --no-build-isolation)"), None
    if torch.version.cuda is None:
        return f"the installed torch {torch.__version__} has no CUDA support", None
    cuda_home = _cuda_home()
    if cuda_home is None:
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)", None
    return None, os.path.join(cuda_home, "bin", "nvcc")


def _has_toolkit(home: Optional[str]) -> bool:
    return bool(home) and os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
        os.path.join(home, "include", "cuda_runtime_api.h"))


def _cuda_home() -> Optional[str]:
    """The CUDA toolkit to build with, also handed to torch's build helpers.

    CUDA_HOME / CUDA_PATH win; otherwise the toolkit of the nvcc on PATH. An nvcc on PATH may be a
    wrapper script (e.g. /usr/local/bin/nvcc), whose parent directory holds no CUDA headers: then
    /usr/local/cuda is tried before giving up.
    """
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        return explicit if os.path.exists(os.path.join(explicit, "bin", "nvcc")) else None
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc is not None:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    home = next((c for c in candidates if _has_toolkit(c)), None)
    if home is not None:
        os.environ["CUDA_HOME"] = home  # read by torch.utils.cpp_extension when it is imported
        import torch.utils.cpp_extension as cpp_extension

        cpp_extension.CUDA_HOME = home  # in case it was imported already
    return home


# ---- ptxas report ------------------------------------------------------------------------------------------
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(log: str) -> List[Dict[str, object]]:
    """One dict per (kernel, arch) from ``-Xptxas -v`` output: registers, spills, stack, static smem."""
    kernels: List[Dict[str, object]] = []
    current: Optional[Dict[str, object]] = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = {"kernel": m.group(1), "arch": m.group(2), "registers": None, "spill_stores": None,
                       "spill_loads": None, "stack_bytes": None, "static_smem_bytes": 0}
            kernels.append(current)
            continue
        if current is None:
            continue
        m = _SPILLS.search(line)
        if m:
            current["stack_bytes"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
            continue
        m = _USED.search(line)
        if m:
            current["registers"] = int(m.group(1))
            current["static_smem_bytes"] = int(m.group(2) or 0)
    # one entry per (kernel, arch): the same template may be compiled in several files
    unique = {(k["kernel"], k["arch"]): k for k in kernels}
    return sorted(unique.values(), key=lambda k: (str(k["kernel"]), str(k["arch"])))


def _demangle(names: List[str]) -> Dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not names:
        return {}
    import subprocess

    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=False).stdout
    return dict(zip(names, out.splitlines()))


def _merge_reports(path: str, compiled: List[Dict[str, object]], archs: List[str]) -> List[Dict[str, object]]:
    """The kernels just compiled, plus those of the previous report at ``path`` that an incremental
    build did not recompile (same archs only; a kernel compiled now replaces its old entry)."""
    try:
        with open(path) as f:
            previous = json.load(f)
    except (OSError, ValueError):
        return compiled
    if previous.get("archs") != archs:
        return compiled
    fresh = {(k["kernel"], k["arch"]) for k in compiled}
    kept = [k for k in previous.get("kernels", []) if (k["kernel"], k["arch"]) not in fresh]
    return sorted(kept + compiled, key=lambda k: (str(k["kernel"]), str(k["arch"])))


class _CaptureFds:
    """Copy everything written to file descriptors 1 and 2 (ninja, nvcc, ptxas) into a file, and echo it."""

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self.file = tempfile.TemporaryFile(mode="w+b")
        self.saved = (os.dup(1), os.dup(2))
        os.dup2(self.file.fileno(), 1)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for fd in self.saved:
            os.close(fd)
        self.file.seek(0)
        self.text = self.file.read().decode("utf-8", "replace")
        self.file.close()
        sys.stdout.write(self.text)
        sys.stdout.flush()
        return False


def _build_ext_class(archs: List[str], nvcc_threads: int):
    from torch.utils.cpp_extension import BuildExtension

    class SemfidBuildExtension(BuildExtension):
        """torch's BuildExtension that also records the ptxas resource report of every kernel."""

        def build_extensions(self):
            import time

            start = time.time()
            with _CaptureFds() as captured:
                super().build_extensions()
            minutes = (time.time() - start) / 60
            kernels = parse_ptxas(captured.text)
            names = _demangle(sorted({str(k["kernel"]) for k in kernels}))
            for k in kernels:
                k["name"] = names.get(str(k["kernel"]), k["kernel"])
            report = {
                "archs": archs,
                "nvcc_threads": nvcc_threads,
                "max_jobs": os.environ.get("MAX_JOBS"),
                "build_minutes": round(minutes, 2),
                "note": "registers/spills/stack from ptxas -v; static_smem_bytes excludes the dynamic "
                        "shared memory sized at launch (see semfid_C::smem_bytes)",
                "kernels": kernels,
            }
            path = self._report_build_path()
            if kernels or not os.path.exists(path):
                report["kernels"] = _merge_reports(path, kernels, archs)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    json.dump(report, f, indent=1)
                _say(f"kernel resource report ({len(kernels)} kernels compiled, {len(report['kernels'])} "
                     f"listed) written to {path}")
            else:
                _say("warning: no ptxas report was captured (nothing recompiled?); keeping the previous one")
            _say(f"CUDA extension built in {minutes:.1f} min")

        # The report travels with the extension: into wheels (get_outputs), into the source tree for
        # editable installs (get_output_mapping) and for build_ext --inplace (copy_extensions_to_source).
        def _report_build_path(self) -> str:
            return os.path.join(self.build_lib, "semfid", RESOURCES_FILE)

        def _report_inplace_path(self) -> str:
            package_dir = self.get_finalized_command("build_py").get_package_dir("semfid")
            return os.path.join(package_dir, RESOURCES_FILE)

        def get_outputs(self):
            return list(super().get_outputs()) + [self._report_build_path()]

        def get_output_mapping(self):
            mapping = dict(super().get_output_mapping()) if hasattr(super(), "get_output_mapping") else {}
            if self.inplace:
                mapping[self._report_build_path()] = self._report_inplace_path()
            return mapping

        def copy_extensions_to_source(self):
            super().copy_extensions_to_source()
            if os.path.exists(self._report_build_path()):
                self.copy_file(self._report_build_path(), self._report_inplace_path(), level=self.verbose)

    return SemfidBuildExtension


def cuda_build(root: str) -> Tuple[List[object], Dict[str, object]]:
    """Return ``(ext_modules, cmdclass)`` for setup(); empty when the CUDA build is skipped."""
    mode = build_mode()
    if mode == "0":
        _say("CUDA kernels skipped (SEMFID_BUILD_CUDA=0); installing pure Python")
        return [], {}
    reason, nvcc = _skip_reason()
    if reason is not None:
        if mode == "1":
            raise SystemExit(f"semfid: SEMFID_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        _say(f"CUDA kernels skipped: {reason}")
        return [], {}

    from torch.utils.cpp_extension import CUDAExtension

    archs = _archs()
    nvcc_threads = _nvcc_threads()
    _set_max_jobs(nvcc_threads)
    csrc = os.path.join(root, "csrc")
    sources = ["csrc/semfid_api.cpp"] + sorted(
        os.path.relpath(p, root) for p in glob.glob(os.path.join(csrc, "instantiations", "*.cu"))
    )
    if len(sources) == 1:
        raise SystemExit("semfid: csrc/instantiations/ holds no .cu files; run python csrc/generate_kernels.py")
    _say(f"building CUDA kernels with {nvcc} for sm_{', sm_'.join(archs)} ({len(sources) - 1} kernel files)")
    ext = CUDAExtension(
        name="semfid._C",
        sources=sources,
        include_dirs=[csrc],
        extra_compile_args={
            # no -std flag: torch adds the C++ standard its headers need (C++20 for torch >= 2.13)
            "cxx": ["-O3"],
            "nvcc": [
                "-O3",
                "-Xptxas=-v",  # the resource report above
                # The hardware cap, stated: without it ptxas (CUDA 13, sm_90) caps the head dim 40
                # forward kernel at 128 registers and spills; with it, 133 registers and no spills.
                "-maxrregcount=255",
                f"--threads={nvcc_threads}",
                "-lineinfo",
                # torch adds these to its own nvcc flags; the kernels use cuda_fp16 operators freely
                "-U__CUDA_NO_HALF_OPERATORS__",
                "-U__CUDA_NO_HALF_CONVERSIONS__",
                "-U__CUDA_NO_BFLOAT16_OPERATORS__",
                "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            ] + _gencode_flags(archs),
        },
    )
    return [ext], {"build_ext": _build_ext_class(archs, nvcc_threads)}
