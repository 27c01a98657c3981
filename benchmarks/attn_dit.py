"""attn_speed's diffusion-transformer cases: the subject loss over joint key sets (issue 21).

Cases (diffusers configs, DESIGN.md §9), B = 1, head-mean maps of S = 4 text tokens over the image
queries, reference detached:

* ``flux``   24 heads × 128, keys [text 512, image], k_ref replaces the 512 text keys;
* ``sd3``    24 heads × 64, keys [image, text 333], k_ref replaces the 333 text keys;
* ``pixart`` 16 heads × 72, cross-attention: image queries, 300 text keys (the UNet meaning).

Image tokens: (px / 16)² — 1024 at 512 px (``--quick`` on a CPU), 4096 at 1024 px (a GPU).
Implementations of subject forward + backward (out and loss; gradients to q, k, v):

* ``semfid``          ``semfid.subject_attention(..., map_queries, ref_segment)``, backend auto;
* ``explicit``        the whole joint softmax [B, H, N, M] with autograd, reference softmax under
                      no_grad (attention-map-diffusers / MOSAIC style);
* ``sdpa_two_calls``  SDPA with augmented values [V, E_tokens] over the joint keys, and a second
                      SDPA over the reference key sequence with E_ref_tokens (no_grad);
* ``flex_lse``        FlexAttention with ``return_lse``, maps as exp(q k_selᵀ·s − lse) (GPU only:
                      on a CPU torch compiles flex for inference only);
* ``sdpa_floor``      plain SDPA over the joint keys, out only: no maps, no loss. Not a way to
                      train with the loss but the floor under a method built on PyTorch's fused
                      attention kernels that keeps nothing of size [B, H, N, M] (semfid's sdpa
                      path): ``explicit / sdpa_floor`` (the table's ``ceiling``) is the most such a
                      method can gain over explicit on the machine it runs on.

Each implementation is checked against the float64 reference on a small joint case first; CPU
timings are interleaved (every round times one call of each). The saved-for-backward and modelled
FLOPs / bytes tables of one Flux 1024-px layer: ``attn_dit_tables.py``.

    python benchmarks/attn_dit.py --quick            # CPU, 512 px (attn_speed.py --quick runs it)
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import semfid  # noqa: E402
from _bench_utils import load_average, short_error, time_cpu_interleaved, time_cuda  # noqa: E402
from semfid.testing import subject_ref  # noqa: E402

Tensor = torch.Tensor
NUM_TOKENS = 4


@dataclass(frozen=True)
class DitCase:
    name: str
    heads: int
    head_dim: int
    text: int
    layout: str  # "text_first" (Flux), "image_first" (SD3), "cross" (PixArt)

    def sizes(self, px: int) -> Tuple[int, int]:
        """(queries N, keys M) at ``px`` pixels."""
        image = (px // 16) ** 2
        return (image, self.text) if self.layout == "cross" else (image + self.text,) * 2


DIT_CASES = [DitCase("flux", 24, 128, 512, "text_first"), DitCase("sd3", 24, 64, 333, "image_first"),
             DitCase("pixart", 16, 72, 300, "cross")]
CASES_BY_NAME = {c.name: c for c in DIT_CASES}


@dataclass
class DitInputs:
    """q [B, H, N, D], k / v [B, H, M, D], k_ref [B, H, text, D] (transposed views of
    [B, n, H·D] projections, as diffusers has them), the op's ranges and token positions."""

    q: Tensor
    k: Tensor
    v: Tensor
    k_ref: Tensor
    tokens: List[int]
    ref_tokens: List[int]
    map_queries: Optional[Tuple[int, int]]
    ref_segment: Optional[Tuple[int, int]]
    scale: float
    dout: Tensor
    dloss: Tensor


def make_dit_inputs(case: DitCase, px: int, batch: int, device, dtype, *, heads: Optional[int] = None,
                    head_dim: Optional[int] = None, text: Optional[int] = None,
                    requires_grad: bool = True, seed: int = 0) -> DitInputs:
    """Inputs of one layer (``heads`` / ``head_dim`` / ``text`` override the case's, for tests)."""
    H, D, T = heads or case.heads, head_dim or case.head_dim, text or case.text
    case = DitCase(case.name, H, D, T, case.layout)
    N, M = case.sizes(px)
    gen = torch.Generator().manual_seed(seed)

    def proj(n, grad):
        base = torch.randn(batch, n, H * D, generator=gen).to(device=device, dtype=dtype)
        return base.requires_grad_(grad).view(batch, n, H, D).transpose(1, 2)

    q, k, v, k_ref = proj(N, requires_grad), proj(M, requires_grad), proj(M, requires_grad), proj(T, False)
    image = N - (0 if case.layout == "cross" else T)
    if case.layout == "cross":
        rows, segment, first = None, None, 0
    elif case.layout == "text_first":
        rows, segment, first = (T, N), (0, T), 0
    else:
        rows, segment, first = (0, image), (image, M), image
    tokens = [first + 1 + i * max(1, (T - 2) // NUM_TOKENS) for i in range(NUM_TOKENS)]
    dout = torch.randn(q.shape, generator=gen).to(device=device, dtype=dtype)
    dloss = torch.ones(batch, device=device, dtype=torch.float32)
    return DitInputs(q, k, v, k_ref, tokens, list(tokens), rows, segment, D ** -0.5, dout, dloss)


# ------------------------------------------------------------------------------------------------
# implementations: (out, loss) with the loss differentiable w.r.t. q and k, the reference detached
# ------------------------------------------------------------------------------------------------
def _reference_keys(x: DitInputs) -> Tensor:
    if x.ref_segment is None:
        return x.k_ref
    a, b = x.ref_segment
    return torch.cat([x.k[:, :, :a], x.k_ref, x.k[:, :, b:]], dim=2)


def _rows(x: DitInputs) -> slice:
    return slice(None) if x.map_queries is None else slice(*x.map_queries)


def _loss(maps_t: Tensor, maps_r: Tensor) -> Tensor:
    return (maps_t.float() - maps_r.float()).square().flatten(1).mean(dim=1)


def semfid_subject(x: DitInputs):
    return semfid.subject_attention(x.q, x.k, x.v, x.k_ref, tokens=x.tokens, ref_tokens=x.ref_tokens,
                                    scale=x.scale, map_queries=x.map_queries,
                                    ref_segment=x.ref_segment)


def explicit_subject(x: DitInputs):
    p = torch.matmul(x.q, x.k.transpose(-1, -2)).mul_(x.scale).softmax(dim=-1)
    out = torch.matmul(p, x.v)
    maps_t = p[:, :, _rows(x)][..., x.tokens].float().mean(dim=1)
    with torch.no_grad():
        p_r = torch.matmul(x.q, _reference_keys(x).transpose(-1, -2)).mul_(x.scale).softmax(dim=-1)
        maps_r = p_r[:, :, _rows(x)][..., x.ref_tokens].float().mean(dim=1)
    return out, _loss(maps_t, maps_r)


def _one_hot(index: List[int], num_keys: int, like: Tensor) -> Tensor:
    B, H = like.shape[:2]
    e = like.new_zeros(num_keys, len(index))
    e[index, torch.arange(len(index))] = 1
    return e.expand(B, H, num_keys, len(index))


def sdpa_two_calls_subject(x: DitInputs):
    Dv = x.v.shape[-1]
    vv = torch.cat([x.v, _one_hot(x.tokens, x.k.shape[2], x.v)], dim=-1)
    o = F.scaled_dot_product_attention(x.q, x.k, vv, scale=x.scale)
    maps_t = o[:, :, _rows(x), Dv:].float().mean(dim=1)
    with torch.no_grad():
        keys = _reference_keys(x)
        maps_r = F.scaled_dot_product_attention(
            x.q[:, :, _rows(x)], keys, _one_hot(x.ref_tokens, keys.shape[2], keys), scale=x.scale)
        maps_r = maps_r.float().mean(dim=1)
    return o[..., :Dv], _loss(maps_t, maps_r)


def _lse_maps(q: Tensor, keys: Tensor, lse: Tensor, index: List[int], scale: float) -> Tensor:
    s = torch.matmul(q, keys[:, :, index].transpose(-1, -2)).float().mul(scale)
    return torch.exp(s - lse[..., None]).mean(dim=1)


def flex_lse_subject(x: DitInputs):
    from baselines import _flex  # the compiled flex_attention of the SD baselines

    out, lse = _flex(x.q, x.k, x.v, x.scale, True)
    rows = _rows(x)
    maps_t = _lse_maps(x.q[:, :, rows], x.k, lse[:, :, rows], x.tokens, x.scale)
    with torch.no_grad():
        keys = _reference_keys(x)
        _, lse_r = _flex(x.q[:, :, rows].detach(), keys, keys, x.scale, True)
        maps_r = _lse_maps(x.q[:, :, rows], keys, lse_r, x.ref_tokens, x.scale)
    return out, _loss(maps_t, maps_r)


def sdpa_floor(x: DitInputs):
    """(out, None): the attention output alone, one fused SDPA call."""
    return F.scaled_dot_product_attention(x.q, x.k, x.v, scale=x.scale), None


IMPLEMENTATIONS: Dict[str, Callable] = {
    "semfid": semfid_subject, "explicit": explicit_subject,
    "sdpa_two_calls": sdpa_two_calls_subject, "flex_lse": flex_lse_subject,
    "sdpa_floor": sdpa_floor,
}


def unavailable(name: str, device: torch.device) -> Optional[str]:
    if name == "flex_lse" and device.type != "cuda":
        return "GPU only (on a CPU torch compiles flex_attention for inference only)"
    return None


def fwd_bwd(fn: Callable, x: DitInputs) -> Callable[[], object]:
    """One forward + backward of ``fn``: gradients of out (and of the loss, where it has one)."""
    def call():
        out, loss = fn(x)
        if loss is None:
            return torch.autograd.grad([out], [x.q, x.k, x.v], [x.dout])
        return torch.autograd.grad([out, loss], [x.q, x.k, x.v], [x.dout, x.dloss])
    return call


# ------------------------------------------------------------------------------------------------
# the reference gate and the timed run
# ------------------------------------------------------------------------------------------------
def check(name: str, device, dtype) -> Optional[str]:
    """None when ``name`` matches the float64 reference on small joint cases, else why not."""
    tol = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    for case in DIT_CASES:
        x = make_dit_inputs(case, 64, 1, device, dtype, heads=2, head_dim=16, text=7)
        got = fwd_bwd(IMPLEMENTATIONS[name], x)()
        got_out, got_loss = IMPLEMENTATIONS[name](x)
        leaves = [t.detach().double().requires_grad_() for t in (x.q, x.k, x.v)]
        out, loss = subject_ref(*leaves, x.k_ref.double(), tokens=x.tokens, ref_tokens=x.ref_tokens,
                                scale=x.scale, map_queries=x.map_queries, ref_segment=x.ref_segment)
        has_loss = got_loss is not None
        want = torch.autograd.grad([out, loss] if has_loss else [out], leaves,
                                   [x.dout.double(), x.dloss.double()] if has_loss else [x.dout.double()])
        compared = [("out", got_out, out)] + ([("loss", got_loss, loss)] if has_loss else [])
        for label, g, w in compared + list(zip(("dq", "dk", "dv"), got, want)):
            err = float((g.detach().double() - w.detach()).abs().max())
            scale = max(1.0, float(w.detach().abs().max()))
            if not err <= tol * scale:
                return f"{case.name}: {label} off by {err:.2e} (tolerance {tol * scale:.1e})"
    return None


def run(cases: List[DitCase], px: int, device, dtype, *, budget_s: float = 0.5,
        names: Optional[List[str]] = None) -> List[str]:
    """Markdown lines: one row per case, ms of subject fwd+bwd per implementation (interleaved
    on a CPU), and semfid's speedup over each."""
    names = names or list(IMPLEMENTATIONS)
    lines, notes, usable = [], [], []
    for name in names:
        reason = unavailable(name, device)
        if reason is None:
            try:
                reason = check(name, device, dtype)
            except Exception as exc:  # noqa: BLE001 - reported, not timed
                reason = f"failed: {short_error(exc)}"
        if reason is None:
            usable.append(name)
        else:
            notes.append(f"{name}: not timed: {reason}")
    others = [n for n in usable if n != "semfid"]
    ceiling = "explicit" in usable and "sdpa_floor" in usable
    lines.append(f"subject fwd+bwd at {px} px, B = 1, {str(dtype).replace('torch.', '')}, {device}: "
                 "ms (median), semfid's speedup over each"
                 + ("; ceiling = explicit / sdpa_floor, the most a method on PyTorch's fused "
                    "kernels that keeps no [B, H, N, M] map can gain over explicit" if ceiling else ""))
    lines.append("")
    lines.append("| case | N × M | " + " | ".join(usable) + " | " + " | ".join(f"× vs {n}" for n in others)
                 + (" | ceiling" if ceiling else "") + " |")
    lines.append("|---" * (2 + len(usable) + len(others) + ceiling) + "|")
    for case in cases:
        x = make_dit_inputs(case, px, 1, device, dtype)
        calls = {n: fwd_bwd(IMPLEMENTATIONS[n], x) for n in usable}
        try:
            for call in calls.values():
                call()  # warm-up (and first-call compilation)
            if device.type == "cuda":
                ms = {n: time_cuda(c).median_ms for n, c in calls.items()}
            else:
                ms = {n: t.median_ms for n, t in time_cpu_interleaved(
                    calls, min_reps=5, max_reps=20, budget_s=budget_s).items()}
        except Exception as exc:  # noqa: BLE001 - one case failing is a note
            notes.append(f"{case.name}: failed: {short_error(exc)}")
            continue
        N, M = x.q.shape[2], x.k.shape[2]
        speed = [f"{ms[n] / ms['semfid']:.2f}" if "semfid" in ms else "–" for n in others]
        if ceiling:
            speed.append(f"{ms['explicit'] / ms['sdpa_floor']:.2f}")
        lines.append(f"| {case.name} ({case.heads}×{case.head_dim}) | {N} × {M} | "
                     + " | ".join(f"{ms[n]:.1f}" for n in usable) + " | " + " | ".join(speed) + " |")
    return lines + [""] + [f"note: {n}" for n in notes]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU: 512 px (default without a GPU)")
    p.add_argument("--px", type=int, default=None, help="image size (default 512 on CPU, 1024 on GPU)")
    p.add_argument("--cases", nargs="+", choices=list(CASES_BY_NAME), default=list(CASES_BY_NAME))
    p.add_argument("--impl", nargs="+", choices=list(IMPLEMENTATIONS), default=None)
    p.add_argument("--budget-s", type=float, default=0.5)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    px = args.px or (512 if args.quick or device.type != "cuda" else 1024)
    print(f"semfid attn_dit: {load_average()}")
    print("\n".join(run([CASES_BY_NAME[c] for c in args.cases], px, device, dtype,
                        budget_s=args.budget_s, names=args.impl)))
    print(f"{load_average()} at the end")
    return 0


__all__ = ["DIT_CASES", "DitCase", "make_dit_inputs", "IMPLEMENTATIONS", "run", "check"]

if __name__ == "__main__":
    sys.exit(main())
