"""The repository's top-level ``kernels/`` folder (installed as ``semfid.kernels``) must not shadow the
PyPI package named ``kernels`` (Hugging Face's hub kernels, a dependency of transformers >= 5.25,
imported with every transformers model) when Python runs from the repository root."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = """
import os, sys
try:
    import kernels
except ModuleNotFoundError as exc:
    print("missing", exc)
else:
    print("found", os.path.abspath(kernels.__file__))
import semfid.kernels
print("semfid", os.path.abspath(semfid.kernels.__file__), hasattr(semfid.kernels, "xattn_fwd"))
"""


def test_top_level_kernels_is_not_semfid_from_the_repository_root():
    res = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    first, second = res.stdout.strip().splitlines()[-2:]
    ours = os.path.join(ROOT, "kernels")
    try:
        importlib.metadata.version("kernels")
        installed = True
    except importlib.metadata.PackageNotFoundError:
        installed = False
    if installed:  # the distribution is what `import kernels` gives
        assert first.startswith("found ") and not first[len("found "):].startswith(ours + os.sep), first
    else:  # as if the folder were not there, with a hint
        assert first.startswith("missing") and "semfid.kernels" in first, first
    assert second.startswith("semfid ") and second.endswith(" True"), second
