"""Build semfid: the pure-Python package, the Triton kernels (``kernels/`` -> ``semfid.kernels``), the
C++ CPU core ``semfid._cpu_ops`` (``csrc/cpu/``) and, when possible, the CUDA extension ``semfid._C``
from ``csrc/``.

Switches (environment variables):
  SEMFID_BUILD_CUDA   auto (default): build when the installed torch has CUDA and nvcc is found;
                      1: build or fail loudly; 0: pure Python.
  SEMFID_BUILD_CPU    auto (default): build the C++ CPU core semfid._cpu_ops (csrc/cpu/) and go
                      on without it if the compiler fails; 1: build or fail; 0: skip.
  SEMFID_CUDA_ARCHS   ';'-separated compute capabilities, default "80;90" ("90a" allowed).
  MAX_JOBS            parallel compile jobs (default: from free memory and cores).
  NVCC_THREADS        threads per nvcc invocation (default 2).

Build against the installed torch with ``pip install --no-build-isolation .``.
"""

from __future__ import annotations

import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from csrc.build_config import cuda_build  # noqa: E402  (build logic lives beside the sources)
from csrc.cpu_build import cpu_build, optional_build_ext  # noqa: E402

ext_modules, cmdclass = cuda_build(HERE)
cpu_extensions = cpu_build()
if cpu_extensions:
    from torch.utils.cpp_extension import BuildExtension

    ext_modules = ext_modules + cpu_extensions
    cmdclass = {**cmdclass, "build_ext": optional_build_ext(cmdclass.get("build_ext", BuildExtension))}

setup(
    packages=find_packages(include=["semfid", "semfid.*"]) + ["semfid.kernels"],
    package_dir={"semfid.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
