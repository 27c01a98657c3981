"""Two tables of one Flux.1 1024-px joint attention layer (B = 1, 24 heads × 128, keys [512 text,
4096 image], S = 4 tokens, detached reference), for issue 21's memory and cost targets.

* Saved for backward (:class:`semfid.testing.SavedBytes`): semfid's subject op, SDPA alone (the
  attention the layer runs anyway) and explicit joint maps. *Counted* on a fake-tensor run (the
  real autograd graph, no data: the same count a real run gives, at any size) for every row, and
  *measured* on real float32 tensors where the explicit graph fits in a quarter of this machine's
  available memory (else the column says so).
* Modelled FLOPs and compulsory bytes of forward + backward (matmul FLOPs; bytes every pass must
  read or write once, bf16 tensors, fp32 lse / maps): plain flash attention (FA2: one pass
  forward, one backward that recomputes the logits), semfid's subject op as designed (the split
  lse: the two attend calls split the keys of one attention; the reference's [Nm, 512] logsumexp;
  maps from lse; the backward with S extra value columns), the sdpa backend as it runs on CPU and
  on CUDA (below), two SDPA calls with augmented values, and explicit joint maps (logits,
  probabilities and their gradients through memory).

  The sdpa backend's rows model its attention kernel calls: forward, two fused calls (outside
  keys, segment: q read and an output written twice); backward, one fused backward fed the saved
  out' = [out, A] and lse with dO' = [dO, G] (no forward recompute), at the widths it runs: on
  CPU q, k and the values padded to D + S (PyTorch's fused CPU kernel wants equal head dims), on
  CUDA the values padded to a multiple of 8 (the memory-efficient kernel; unverified on a GPU).
  The torch backend's CPU row runs the same forward and a backward at the head dim D: the maps'
  gradient G enters as the row term c = rowsum(G ⊙ A) (carried in the out the kernel is given)
  plus two [Nm, S] products on the selected columns (``joint._sparse_map_backward``: the fused
  CPU kernel at D + S costs ~12 % more than at D, on CPU compute counts, not bytes). Their
  bytes are a *lower bound*: each
  tensor of each kernel call read or written once; the element-wise glue around the calls (casts,
  copies, combining the two partial outputs) is not counted (``attn_launches.LaunchCounter``
  observes it). The torch backend on float32 CPU tensors runs whole-row products instead
  (:mod:`semfid.backends.gemm_attention`): the same FLOPs as the fused calls, its per-(batch,
  head) contiguous copies counted, and its logit blocks (4 MiB each, written and read by the
  products and the row kernels: 4 passes forward, 9 backward) given apart under the table: they
  pass through the CPU's caches, not its DRAM, where the L3 holds a block.

    python benchmarks/attn_dit_tables.py
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench_utils import load_average, short_error  # noqa: E402
from attn_dit import CASES_BY_NAME, DitInputs, explicit_subject, semfid_subject  # noqa: E402
from semfid.testing import SavedBytes  # noqa: E402

FLUX = CASES_BY_NAME["flux"]
PX = 1024
MIB = float(1 << 20)


def _inputs(dtype: torch.dtype) -> DitInputs:
    """The Flux 1024-px layer's inputs (zeros: the tables need shapes, not values)."""
    H, D, T = FLUX.heads, FLUX.head_dim, FLUX.text
    N, M = FLUX.sizes(PX)

    def proj(n: int, grad: bool) -> torch.Tensor:
        return torch.zeros(1, n, H * D, dtype=dtype).requires_grad_(grad).view(1, n, H, D).transpose(1, 2)

    q, k, v = proj(N, True), proj(M, True), proj(M, True)
    tokens = [1, 100, 200, 300]
    return DitInputs(q, k, v, proj(T, False), tokens, list(tokens), (T, N), (0, T), D ** -0.5,
                     torch.zeros(q.shape, dtype=dtype), torch.ones(1))


def _sdpa_alone(x: DitInputs):
    return F.scaled_dot_product_attention(x.q, x.k, x.v, scale=x.scale), None


ROWS: Dict[str, Callable] = {"semfid subject op": semfid_subject, "SDPA alone": _sdpa_alone,
                             "explicit joint maps": explicit_subject}


class _FakeSavedBytes(SavedBytes):
    """:class:`SavedBytes` keyed by storage identity (fake tensors have no data pointers)."""

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        self._storages[StorageWeakRef(storage)] = storage.nbytes()
        return t


def _count(fn: Callable, dtype: torch.dtype, fake: bool) -> int:
    if fake:
        with FakeTensorMode():
            x = _inputs(dtype)
            with _FakeSavedBytes() as saved:
                result = fn(x)
    else:
        x = _inputs(dtype)
        with SavedBytes() as saved:
            result = fn(x)
    del result
    return saved.nbytes


def _available_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def saved_table(dtype: torch.dtype = torch.bfloat16) -> List[str]:
    counted = {}
    for name, fn in ROWS.items():
        try:
            counted[name] = _count(fn, dtype, fake=True)
        except Exception as exc:  # noqa: BLE001
            counted[name] = short_error(exc)
    avail = _available_bytes()
    explicit32 = counted.get("explicit joint maps")
    big = isinstance(explicit32, int) and avail is not None and 2 * explicit32 > avail / 4
    lines = [f"Saved for backward, Flux 1024-px layer (N = M = {sum(FLUX.sizes(PX)) // 2}, B = 1, "
             f"24 × 128, S = 4): counted on fake tensors in {str(dtype).replace('torch.', '')}; "
             "measured on real float32 tensors where they fit", "",
             "| | counted (MiB) | × SDPA alone | measured fp32 (MiB) |", "|---|---|---|---|"]
    base = counted.get("SDPA alone")
    for name, fn in ROWS.items():
        c = counted[name]
        if not isinstance(c, int):
            lines.append(f"| {name} | failed: {c} | | |")
            continue
        ratio = f"{c / base:.3f}" if isinstance(base, int) else "–"
        if name == "explicit joint maps" and big:
            measured = f"not run: ~{2 * c / MIB:.0f} MiB > 1/4 of {avail / MIB:.0f} MiB available (computed)"
        else:
            try:
                measured = f"{_count(fn, torch.float32, fake=False) / MIB:.1f}"
            except Exception as exc:  # noqa: BLE001
                measured = f"failed: {short_error(exc)}"
        lines.append(f"| {name} | {c / MIB:.1f} | {ratio} | {measured} |")
    return lines


def sdpa_forward(N: int, M: int, D: int, H: int, e: int) -> Dict[str, float]:
    """The sdpa backend's forward kernel calls (B = 1): two fused attention calls that split the
    M keys (outside keys, segment), each reading q and writing an output [N, D] and an fp32 lse."""
    return {"flops": 4 * N * M * D * H, "bytes": H * e * (4 * N * D + 2 * M * D) + 2 * N * H * 4}


def sdpa_backward(N: int, M: int, H: int, e: int, wq: int, wv: int) -> Dict[str, float]:
    """The sdpa backend's one fused backward (B = 1) at q / k width ``wq`` and value width ``wv``:
    logits, dQ, dK at wq, dP, dV at wv; reads dO', q, k, vv, out', lse, writes dq, dk, dvv."""
    return {"flops": 2 * N * M * H * (3 * wq + 2 * wv),
            "bytes": H * e * (N + M) * (2 * wq + 2 * wv) + N * H * 4}


def modelled(N: int = 4608, Nm: int = 4096, T: int = 512, R: int = 512, D: int = 128, H: int = 24,
             S: int = 4, e: int = 2) -> Dict[str, Dict[str, float]]:
    """FLOPs and compulsory bytes of forward + backward (see the module docstring)."""
    M = N
    nmd, nd, md = N * M * D * H, N * D * H * e, M * D * H * e
    lse = N * H * 4
    small_f = 2 * Nm * R * D * H + 3 * 2 * Nm * S * D * H  # L_R, A_t, A_r (+ A_t again in bwd)
    small_b = R * D * H * e + 3 * Nm * S * 4  # k_ref, maps / diff
    plain_f = 4 * nmd + 10 * nmd
    plain_b = (nd + 2 * md + nd + lse) + (3 * nd + 2 * md + lse + nd + 2 * md)
    aug = 4 * N * M * S * H  # dP and dV with S extra value columns
    explicit_pass = N * M * H * e

    def gemm_cpu_row() -> Dict[str, float]:
        """The torch backend's float32 CPU path: the fused rows' FLOPs and tensors, plus the
        per-(b, h) copies (fp32, written and read): forward q·scale, k, vᵀ per attend call;
        backward q·scale and its transpose, dO and its transpose, k and v by key blocks."""
        row = backend_row(D, D, True)
        copies = 2 * 4 * H * (2 * (N * D + M * D + M * D) + 4 * N * D + 2 * M * D)
        return {"flops": row["flops"], "bytes": row["bytes"] + copies,
                "blocks": 4 * (4 + 9) * N * M * H}

    def backend_row(wq: int, wv: int, sparse: bool) -> Dict[str, float]:
        fwd, bwd = sdpa_forward(N, M, D, H, e), sdpa_backward(N, M, H, e, wq, wv)
        # CPU: dq += (A⊙G) k_sel, dk_sel += (A⊙G)ᵀ q over the map rows (q read, dq's rows updated)
        extra_f, extra_b = (4 * Nm * S * D * H, 2 * Nm * D * H * e) if sparse else (0, 0)
        return {"flops": fwd["flops"] + bwd["flops"] + small_f + extra_f,
                "bytes": fwd["bytes"] + bwd["bytes"] + small_b + extra_b}

    return {
        "plain attention (FA2)": {"flops": plain_f, "bytes": plain_b},
        "semfid subject op (design)": {"flops": plain_f + aug + small_f, "bytes": plain_b + small_b},
        "semfid sdpa backend, CPU": backend_row(D + S, D + S, False),
        "semfid sdpa backend, CUDA (unverified)": backend_row(-(-D // 8) * 8, -(-(D + S) // 8) * 8, False),
        "semfid torch backend, CPU fp16/bf16/fp64 (fused kernels)": backend_row(D, D, True),
        "semfid torch backend, CPU fp32 (GEMM blocks)": gemm_cpu_row(),
        "two SDPA calls, augmented values": {
            "flops": plain_f + aug + 2 * Nm * (M - T + R) * (D + S) * H,  # + the reference call
            "bytes": plain_b + (Nm * D * H * e + (M - T + R) * D * H * e)},
        "explicit joint maps": {"flops": 4 * nmd + 8 * nmd + 2 * Nm * (M - T + R) * D * H,
                                "bytes": plain_b + 8 * explicit_pass},
    }


def modelled_table() -> List[str]:
    rows = modelled()
    base = rows["plain attention (FA2)"]
    lines = ["Modelled forward + backward, Flux 1024-px layer (B = 1, bf16 tensors): matmul FLOPs "
             "and compulsory bytes (backend rows: their kernel calls' tensors once each, a lower bound)", "", "| | GFLOP | × plain | GB | × plain |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['flops'] / 1e9:.0f} | {r['flops'] / base['flops']:.3f} | "
                     f"{r['bytes'] / 1e9:.3f} | {r['bytes'] / base['bytes']:.2f} |")
    for name, r in rows.items():
        if "blocks" in r:
            lines.append(f"\n{name}: besides, {r['blocks'] / 1e9:.1f} GB of fp32 logit blocks of at "
                         "most 4 MiB each, written and read by its products and row kernels "
                         "(cache traffic where the CPU's L3 holds a block)")
    return lines


def main() -> int:
    print(f"semfid attn_dit_tables: {load_average()}")
    print("\n".join(modelled_table()))
    print()
    print("\n".join(saved_table()))
    print(f"{load_average()} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
