"""Decide whether ``setup.py`` builds the C++ CPU extension ``semfid._cpu_ops`` (csrc/cpu/).

SEMFID_BUILD_CPU: ``auto`` (default) builds it whenever torch is importable and lets the install go
on without it if the compiler fails (the torch backend then runs its Python implementation);
``1`` builds it or fails the install; ``0`` skips it. It needs only a C++ compiler and torch's
headers (no CUDA), and compiles in two to three minutes on two cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import List

from .build_config import _say, build_mode

SOURCES = ["csrc/cpu/subject_core.cpp", "csrc/cpu/subject_small.cpp", "csrc/cpu/row_exp.cpp"]
NAME = "semfid._cpu_ops"


def cpu_build() -> List[object]:
    """The extension for setup(), or [] when it is skipped. ``ext.optional`` marks an auto build."""
    mode = build_mode("SEMFID_BUILD_CPU")
    if mode == "0":
        _say("C++ CPU core skipped (SEMFID_BUILD_CPU=0); the torch backend runs in Python")
        return []
    try:
        from torch.utils.cpp_extension import CppExtension
    except ImportError as exc:
        if mode == "1":
            raise SystemExit(f"semfid: SEMFID_BUILD_CPU=1 but torch is not importable: {exc}")
        _say(f"C++ CPU core skipped: torch is not importable in the build environment ({exc})")
        return []
    # -fno-trapping-math: no FP operation is assumed to trap (the default IEEE environment), so
    # the compiler may vectorise loops with a select; results, inf and NaN are unchanged.
    cxx = ["-O3", "-fno-trapping-math"]
    link: List[str] = []
    if openmp_works():  # at::parallel_for is an OpenMP loop in torch's headers: without the flag
        cxx.append("-fopenmp")  # it runs on one thread (the runtime is torch's own libgomp)
        link.append("-fopenmp")
    else:
        _say("C++ CPU core: the compiler does not take -fopenmp; its small-layer loops run on one thread")
    ext = CppExtension(name=NAME, sources=SOURCES, extra_compile_args={"cxx": cxx},
                       extra_link_args=link)
    ext.optional = mode == "auto"
    return [ext]


def openmp_works() -> bool:
    """Whether the C++ compiler setuptools will use builds and links a file with -fopenmp."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        cmd = compiler.split() + ["-fopenmp", src, "-o", os.path.join(tmp, "probe")]
        try:
            return subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


def optional_build_ext(base: type) -> type:
    """``base`` (a build_ext class) whose failure on an optional extension is a warning, whatever
    the compiler raised (torch's ninja path raises RuntimeError, which setuptools' own handling of
    ``optional`` does not catch)."""

    class OptionalExtensionBuild(base):
        def build_extension(self, ext):
            if not getattr(ext, "optional", False):
                return super().build_extension(ext)
            try:
                return super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - reported, and the install goes on
                _say(f"warning: {ext.name} was not built ({type(exc).__name__}: {exc}); the torch "
                     "backend will run its Python implementation (SEMFID_BUILD_CPU=1 makes this fatal)")
                return None

    return OptionalExtensionBuild
