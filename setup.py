"""Build semfid: the pure-Python package, the Triton kernels (``kernels/`` -> ``semfid.kernels``) and,
when possible, the CUDA extension ``semfid._C`` from ``csrc/``.

Switches (environment variables):
  SEMFID_BUILD_CUDA   auto (default): build when the installed torch has CUDA and nvcc is found;
                      1: build or fail loudly; 0: pure Python.
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

ext_modules, cmdclass = cuda_build(HERE)

setup(
    packages=find_packages(include=["semfid", "semfid.*"]) + ["semfid.kernels"],
    package_dir={"semfid.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
