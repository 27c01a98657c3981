"""Shared pieces of the semfid benchmarks: SD shapes, timers, saved-bytes counter, bandwidth probe.

Nothing here knows about a particular implementation; ``attn_speed.py`` and ``train_step.py`` build
on it. Timers return a :class:`Timing` (median and inter-quartile range in milliseconds).
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional

import torch

from semfid.testing import SavedBytes  # noqa: F401  (re-exported for attn_speed)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MIB = float(1 << 20)

# ------------------------------------------------------------------------------------------------
# Shapes: every distinct cross-attention (attn2) shape of SD1.5 at 512 px and SDXL base at 1024 px.
# Keys are always the 77 CLIP text tokens; K/V are projected to the query's inner dim, so the head
# dim of q, k and v is the same. (DESIGN.md §3, checked against diffusers 0.42.1 configs.)
# ------------------------------------------------------------------------------------------------
NUM_TEXT_TOKENS = 77


@dataclass(frozen=True)
class XattnShape:
    name: str          # short id used in tables and JSON
    model: str         # "SD1.5" / "SDXL"
    latent: str        # latent resolution of the level, e.g. "64x64"
    n_q: int           # query tokens (latent pixels)
    heads: int
    head_dim: int
    layers: int        # how many attn2 layers of the UNet have this shape

    @property
    def label(self) -> str:
        return f"{self.model} {self.latent}: N={self.n_q}, {self.heads}x{self.head_dim}"


SD_SHAPES: List[XattnShape] = [
    # SD1.5 64x64: N=4096, 8 heads x 40 (320 channels; down_blocks.0, up_blocks.3)
    XattnShape("sd15_64", "SD1.5", "64x64", 4096, 8, 40, 5),
    # SD1.5 32x32: N=1024, 8 heads x 80 (640 channels; down_blocks.1, up_blocks.2)
    XattnShape("sd15_32", "SD1.5", "32x32", 1024, 8, 80, 5),
    # SD1.5 16x16: N=256, 8 heads x 160 (1280 channels; down_blocks.2, up_blocks.1)
    XattnShape("sd15_16", "SD1.5", "16x16", 256, 8, 160, 5),
    # SD1.5 8x8: N=64, 8 heads x 160 (1280 channels; mid_block)
    XattnShape("sd15_8", "SD1.5", "8x8", 64, 8, 160, 1),
    # SDXL 64x64: N=4096, 10 heads x 64 (640 channels; down_blocks.1, up_blocks.1, 2 blocks each)
    XattnShape("sdxl_64", "SDXL", "64x64", 4096, 10, 64, 10),
    # SDXL 32x32: N=1024, 20 heads x 64 (1280 channels; down_blocks.2, up_blocks.0, mid_block,
    # 10 transformer blocks each)
    XattnShape("sdxl_32", "SDXL", "32x32", 1024, 20, 64, 60),
]
# 5+5+5+1 = 16 attn2 layers for SD1.5 and 10+60 = 70 for SDXL, as in DESIGN.md §3.

SHAPES_BY_NAME = {s.name: s for s in SD_SHAPES}


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    median_ms: float
    iqr_ms: float
    reps: int


def _summarize(samples_ms: List[float]) -> Timing:
    samples_ms = sorted(samples_ms)
    if len(samples_ms) >= 4:
        q1, _, q3 = statistics.quantiles(samples_ms, n=4)
    else:
        q1, q3 = samples_ms[0], samples_ms[-1]
    return Timing(statistics.median(samples_ms), q3 - q1, len(samples_ms))


def time_cpu(fn: Callable[[], object], *, warmup: int = 2, min_reps: int = 5, max_reps: int = 50,
             budget_s: float = 1.0) -> Timing:
    """Median/IQR of ``fn()`` with ``time.perf_counter``, after ``warmup`` untimed calls.

    Runs at least ``min_reps`` timed calls and stops adding calls once ``budget_s`` is spent
    (or ``max_reps`` is reached).
    """
    for _ in range(warmup):
        fn()
    samples: List[float] = []
    start = time.perf_counter()
    while len(samples) < max_reps:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        if len(samples) >= min_reps and time.perf_counter() - start >= budget_s:
            break
    return _summarize(samples)


def time_cpu_interleaved(calls: Dict[str, Callable[[], object]], *, min_reps: int = 5,
                         max_reps: int = 50, budget_s: float = 1.0) -> Dict[str, Timing]:
    """:func:`time_cpu` for several functions at once, round-robin: every round times one call of
    each, so a burst of load from other processes hits all of them alike and their ratios stay
    meaningful on a shared machine. ``budget_s`` is per function; call each once before (warm-up).
    """
    samples: Dict[str, List[float]] = {name: [] for name in calls}
    start = time.perf_counter()
    for rep in range(max_reps):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t0) * 1e3)
        if rep + 1 >= min_reps and time.perf_counter() - start >= budget_s * len(calls):
            break
    return {name: _summarize(s) for name, s in samples.items()}


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    # 256 MiB is larger than the L2 of any current GPU (H100: 50 MB), as in triton.testing.do_bench.
    return torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)


def time_cuda(fn: Callable[[], object], *, warmup_ms: float = 25.0, rep_ms: float = 100.0) -> Timing:
    """Median/IQR of ``fn()`` on the current CUDA device, L2 flushed before every call.

    Uses ``triton.testing.do_bench`` when Triton is importable, else CUDA events directly (the same
    procedure: estimate one call, then warm up and time for about ``warmup_ms`` / ``rep_ms``).
    """
    try:
        from triton.testing import do_bench
    except Exception:  # noqa: BLE001 - any import failure means "no triton here"
        do_bench = None
    if do_bench is not None:
        q1, med, q3 = do_bench(fn, warmup=int(warmup_ms), rep=int(rep_ms), quantiles=[0.25, 0.5, 0.75])
        # do_bench does not report its repetition count; estimate it from its own time budget.
        return Timing(float(med), float(q3 - q1), max(1, int(rep_ms / max(med, 1e-3))))

    cache = _l2_flush_buffer(torch.device("cuda"))
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        cache.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    n_warm, n_rep = max(1, int(warmup_ms / estimate)), max(5, int(rep_ms / estimate))
    for _ in range(n_warm):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for s, e in zip(starts, ends):
        cache.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return _summarize([s.elapsed_time(e) for s, e in zip(starts, ends)])


def time_fn(fn: Callable[[], object], device: torch.device, *, budget_s: float = 1.0) -> Timing:
    """:func:`time_cuda` on a CUDA device, :func:`time_cpu` elsewhere."""
    if device.type == "cuda":
        return time_cuda(fn)
    return time_cpu(fn, budget_s=budget_s)


# ------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------
def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak CUDA memory allocated during one ``fn()`` beyond what was allocated before; None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / MIB


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> Optional[float]:
    """Device-to-device copy bandwidth in GB/s (read + write counted), measured now; None on CPU.

    This is the practical memory roofline the attention kernels are compared against (% of copy).
    """
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_cuda(functools.partial(dst.copy_, src))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9


# ------------------------------------------------------------------------------------------------
# Errors, load and environment header
# ------------------------------------------------------------------------------------------------
def short_error(exc: BaseException) -> str:
    """One line for a report. semfid's dispatcher errors keep their per-backend reasons only
    (their second line is a long summary of the inputs)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reasons = [line for line in lines if "cannot run them:" in line]
    text = "; ".join(reasons) if reasons else (lines[0] if lines else "")
    return f"{type(exc).__name__}: {text[:300]}"


def load_average() -> str:
    """The machine's 1/5/15-minute load averages now, for printing beside CPU timings."""
    if not hasattr(os, "getloadavg"):
        return "load average unavailable"
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min, {os.cpu_count()} cores)"


# ------------------------------------------------------------------------------------------------
# Environment header and progress
# ------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Machine and software versions, for the report header and the JSON file."""
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        # 1-minute load average when the run started: CPU timings taken while other processes load
        # the machine are slower and noisier; the number says how busy it was.
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    try:
        import semfid

        info["semfid"] = semfid.__version__
        info["semfid_backends"] = semfid.available_backends()
    except Exception as exc:  # noqa: BLE001
        info["semfid"] = f"import failed: {exc}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / (1 << 30), 1)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
    return info


def format_environment(info: dict) -> str:
    lines = [f"date: {info['date_utc']}   host: {info['host']}"]
    lines.append(f"cpu: {info['cpu']} ({info['cpu_count']} cores, torch threads {info['torch_threads']}, "
                 f"load average {info['load_avg_1m']} at start)")
    if "gpu" in info:
        lines.append(f"gpu: {info['gpu']} ({info['gpu_memory_gib']} GiB, sm {info['gpu_capability']})")
    lines.append(
        f"python {info['python']}  torch {info['torch']}  cuda {info['cuda']}  triton {info['triton']}  "
        f"semfid {info.get('semfid')}  backends {info.get('semfid_backends')}"
    )
    return "\n".join(lines)


class _SimpleProgress:
    """Fallback progress bar when tqdm is not installed: one line per 10%."""

    def __init__(self, items: List, desc: str) -> None:
        self.items, self.desc, self._last = items, desc, -1

    def __iter__(self):
        n = max(1, len(self.items))
        for i, item in enumerate(self.items):
            pct = 100 * i // n
            if pct // 10 != self._last:
                self._last = pct // 10
                print(f"{self.desc}: {pct:3d}% ({i}/{n})", file=sys.stderr, flush=True)
            yield item
        print(f"{self.desc}: 100% ({n}/{n})", file=sys.stderr, flush=True)

    def set_postfix_str(self, s: str) -> None:  # tqdm-compatible no-op
        pass


def progress(items: Iterable, desc: str, enabled: bool = True):
    items = list(items)
    if not enabled:
        return _Silent(items)
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False)
    except ImportError:
        return _SimpleProgress(items, desc)


class _Silent:
    def __init__(self, items: List) -> None:
        self.items = items

    def __iter__(self):
        return iter(self.items)

    def set_postfix_str(self, s: str) -> None:
        pass
