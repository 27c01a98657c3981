"""Kernel launches and modelled bytes of one call, observed while it runs.

:class:`LaunchCounter` is a ``TorchDispatchMode``: every aten op dispatched under it that launches a
kernel (not views, not allocations) is counted, and so is every Triton kernel launch (hooked at
``kernel[grid](...)``) and every op of the CUDA extension. semfid's ``torch.library`` ops are
opened up: their Python implementation runs under the counter, so the copies, casts and reductions
a backend does around its kernels are counted too. For each launch the bytes of the tensors it is
given are added up (:mod:`attn_traffic`): the modelled traffic of the implementation's passes.
The torch backend's small-layer loops on CPU tensors (``csrc/cpu/subject_small.cpp``, layers of at
most ``semfid.backends.torch._SMALL_WORK`` multiply-adds) are plain C++, not aten ops, and are not
seen: count those shapes with ``_SMALL_WORK = 0``.

On a machine without a GPU the Triton path (the one a GPU runs) is observed in a child process with
``TRITON_INTERPRET=1`` (it must be set before triton is imported): the launch count on a tiny shape
with the kernels really interpreted, and the bytes at the SD shapes with the kernels recorded but not
executed (neither the count nor the bytes depend on what the kernels compute).

The table on its own: ``python benchmarks/attn_launch_table.py --dtype float16 --batch 2
--cases sd15_64 sdxl_64`` (this module's ``main`` is the interpreter child).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from _bench_utils import SD_SHAPES, SHAPES_BY_NAME, short_error  # noqa: E402
from attn_cases import make_inputs, mode_call  # noqa: E402
from attn_traffic import tensors_bytes  # noqa: E402

SEMFID_NAMESPACES = ("semfid",)        # torch.library ops implemented in Python: opened up
EXTENSION_NAMESPACES = ("semfid_C",)   # the CUDA extension: each op counted as one launch
# aten ops that launch no kernel: allocations and metadata changes (views are detected by schema).
NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view",
             "_reshape_alias", "lift_fresh", "resize_", "set_", "sym_size", "sym_stride", "sym_numel"}
TINY = dict(batch=1, n_q=17, heads=2, head_dim=16)  # interpreter-sized: a few programs per kernel


@dataclass
class Observation:
    """What one call launched: ``kernels`` name -> count, and the modelled bytes moved."""

    kernels: Counter = field(default_factory=Counter)
    bytes: int = 0

    @property
    def launches(self) -> int:
        return sum(self.kernels.values())

    def add(self, name: str, tensors: List[torch.Tensor]) -> None:
        self.kernels[name] += 1
        self.bytes += tensors_bytes(tensors)


def _tensors(*trees) -> List[torch.Tensor]:
    return [t for t in tree_leaves(list(trees)) if isinstance(t, torch.Tensor)]


class LaunchCounter(TorchDispatchMode):
    """Counts kernel launches and their tensors' bytes; ``execute_triton=False`` records Triton
    launches without running them (only sensible under the interpreter, to observe large shapes)."""

    def __init__(self, execute_triton: bool = True) -> None:
        super().__init__()
        self.observed = Observation()
        self.execute_triton = execute_triton
        self._unhook: Optional[Callable[[], None]] = None
        self._depth = 0

    def __enter__(self):
        # entered again (re-pushed) while running a semfid op's body: hook triton only once
        self._depth += 1
        if self._depth == 1:
            self._unhook = _hook_triton(self)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._depth -= 1
            if self._depth == 0 and self._unhook is not None:
                self._unhook()
                self._unhook = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        namespace, name = func.namespace, func._schema.name.split("::")[-1]
        if namespace in SEMFID_NAMESPACES:
            from torch._library.custom_ops import OPDEFS

            opdef = OPDEFS.get(func._schema.name)
            if opdef is not None:  # run its Python body under this mode: see inside the op
                impl = opdef._backend_fns.get(_device_type(args), None) or opdef._init_fn
                with self:
                    return impl(*args, **kwargs)
        out = func(*args, **kwargs)
        if namespace in EXTENSION_NAMESPACES or (
                namespace == "aten" and not func.is_view and name not in NO_KERNEL):
            self.observed.add(f"{namespace}.{name}", _tensors(args, kwargs, out))
        return out


def _device_type(args) -> Optional[str]:
    for t in _tensors(args):
        return t.device.type
    return None


def _hook_triton(counter: LaunchCounter) -> Optional[Callable[[], None]]:
    """Count ``kernel[grid](...)`` launches (autotuner benchmarking inside a launch is not counted
    again). Returns the function that removes the hook, or None when triton is not imported."""
    if "triton" not in sys.modules:
        return None
    from triton.runtime.jit import KernelInterface

    original = KernelInterface.__getitem__

    def getitem(kernel, grid):
        launch = original(kernel, grid)

        def counted(*args, **kwargs):
            name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "?")
            counter.observed.add(f"triton.{name}", _tensors(args, kwargs))
            if not counter.execute_triton:
                return None
            with _disable_current_modes():  # the interpreter's host copies are not the op's kernels
                return launch(*args, **kwargs)
        return counted

    KernelInterface.__getitem__ = getitem

    def unhook():
        KernelInterface.__getitem__ = original
    return unhook


def observe(call: Callable[[], object], *, execute_triton: bool = True) -> Observation:
    """Run ``call`` once under a :class:`LaunchCounter`."""
    counter = LaunchCounter(execute_triton=execute_triton)
    with counter:
        call()
    return counter.observed


# ------------------------------------------------------------------------------------------------
# the Triton path on a CPU-only machine: a child process under TRITON_INTERPRET=1
# ------------------------------------------------------------------------------------------------
def _triton_child(cases: List[str], batch: int, dtype: torch.dtype, mode: str = "subject_fwd_bwd") -> dict:
    """In the child: launches on the tiny shape (kernels interpreted, then only recorded: the counts
    must agree), and launches and bytes per case (kernels recorded). Returns {"launches", "kernels",
    "recording_changes_count", "cases": {case: {"launches", "bytes", "kernels"}}} or {"error"}.
    (The count can change with size: e.g. the dk/dv partials are summed only when split.)"""
    from attn_impls import semfid_implementation

    impl = semfid_implementation("triton")
    cpu = torch.device("cpu")
    reason = impl.unavailable(cpu, dtype)
    if reason is not None:
        return {"error": reason}
    tiny_call = mode_call(impl, mode, make_inputs(**TINY, device=cpu, dtype=dtype))
    tiny = observe(tiny_call)
    recorded = observe(tiny_call, execute_triton=False)
    result = {"launches": tiny.launches, "kernels": dict(tiny.kernels), "cases": {},
              "recording_changes_count": recorded.kernels != tiny.kernels}
    for name in cases:
        s = SHAPES_BY_NAME[name]
        x = make_inputs(batch, s.n_q, s.heads, s.head_dim, cpu, dtype)
        seen = observe(mode_call(impl, mode, x), execute_triton=False)
        result["cases"][name] = {"launches": seen.launches, "bytes": seen.bytes,
                                 "kernels": dict(seen.kernels)}
    return result


def triton_path(cases: List[str], batch: int, dtype: torch.dtype, *, mode: str = "subject_fwd_bwd",
                timeout_s: float = 300) -> dict:
    """:func:`_triton_child` in a fresh interpreter with TRITON_INTERPRET=1."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--batch", str(batch), "--mode", mode,
           "--dtype", str(dtype).replace("torch.", ""), "--cases", *cases]
    env = dict(os.environ, TRITON_INTERPRET="1")
    try:  # the child imports the same semfid as this process (a checkout may shadow an install)
        import semfid

        root = os.path.dirname(os.path.dirname(os.path.abspath(semfid.__file__)))
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    except ImportError:
        pass
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"the interpreter child took more than {timeout_s:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"interpreter child failed (rc {proc.returncode}): {tail[:300]}"}
    return json.loads(lines[-1])


def main(argv=None) -> int:
    """The interpreter child of :func:`triton_path` (the standalone table: attn_launch_table.py)."""
    p = argparse.ArgumentParser(description="the Triton-path child of attn_launches.triton_path")
    p.add_argument("--cases", nargs="+", choices=[s.name for s in SD_SHAPES], required=True)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="subject_fwd_bwd", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        print(json.dumps(_triton_child(args.cases, args.batch, getattr(torch, args.dtype), args.mode)))
    except Exception as exc:  # noqa: BLE001 - reported by the parent
        print(json.dumps({"error": short_error(exc)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
