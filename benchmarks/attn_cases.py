"""The inputs attn_speed runs on, and one call per mode.

The shapes themselves (every distinct cross-attention shape of SD1.5 and SDXL, each named after its
UNet level) live in :mod:`_bench_utils` (``SD_SHAPES``), shared with the other benchmarks. Here: the
[B, H, N, D] tensors of one case, laid out as a diffusers processor has them, and the no-argument
callable that runs one mode of one implementation on them (what the timer repeats, the reference gate
checks and the launch counter observes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch

from _bench_utils import NUM_TEXT_TOKENS, SD_SHAPES
from baselines import Implementation

NUM_MAP_TOKENS = 10  # "head-mean maps of 10 tokens": a prompt's worth of words
QUICK_CASES = [s.name for s in SD_SHAPES]  # every shape, but batch 2 only and a short time budget
QUICK_BATCHES = [2]
GPU_BATCHES = [2, 8]
# The reference gate's case: odd query count, SD1.5's head dim (40: not a multiple of 16).
CHECK_SHAPE = dict(batch=2, n_q=67, heads=3, head_dim=40)


@dataclass
class CaseInputs:
    """One case: q [B, H, N, D], k / v / k_ref [B, H, M, D] (transposed views of [B, N, H·D]),
    tokens [S] int64, dout like q, dloss [B] float32 (ones: the loss is summed over the batch)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_ref: torch.Tensor
    tokens: torch.Tensor
    scale: float
    dout: torch.Tensor
    dloss: torch.Tensor


def make_inputs(batch: int, n_q: int, heads: int, head_dim: int, device: torch.device,
                dtype: torch.dtype, *, num_keys: int = NUM_TEXT_TOKENS,
                num_tokens: int = NUM_MAP_TOKENS, seed: int = 0) -> CaseInputs:
    """Inputs laid out as a diffusers processor has them: [B, N, H·D] projections viewed as
    [B, H, N, D] (non-contiguous), q/k/v requiring grad, the reference keys not."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def proj(n, requires_grad):
        base = torch.randn(batch, n, heads * head_dim, generator=gen).to(device=device, dtype=dtype)
        base.requires_grad_(requires_grad)
        return base.view(batch, n, heads, head_dim).transpose(1, 2)

    q, k, v = proj(n_q, True), proj(num_keys, True), proj(num_keys, True)
    k_ref = proj(num_keys, False)
    tokens = torch.arange(1, 1 + num_tokens, device=device) % num_keys
    dout = torch.randn(q.shape, generator=gen).to(device=device, dtype=dtype)
    dloss = torch.ones(batch, device=device, dtype=torch.float32)
    return CaseInputs(q, k, v, k_ref, tokens, head_dim ** -0.5, dout, dloss)


def _grads(outputs: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor],
           inputs: Sequence[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    """torch.autograd.grad over the outputs that carry a graph (a floor's zero loss does not)."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
    return torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)


def mode_call(impl: Implementation, mode: str, x: CaseInputs) -> Callable[[], object]:
    """A no-argument callable running ``mode`` of ``impl`` once on ``x``.

    ``forward`` / ``forward_maps`` run under ``no_grad``; ``subject_fwd_bwd`` runs the forward and
    the backward of both the output and the loss (gradients to q, k and v).
    """
    fn = impl.function(mode)
    if mode == "forward":
        def call():
            with torch.no_grad():
                return fn(x.q, x.k, x.v, x.scale)
    elif mode == "forward_maps":
        def call():
            with torch.no_grad():
                return fn(x.q, x.k, x.v, x.tokens, x.scale)
    else:
        def call():
            out, loss = fn(x.q, x.k, x.v, x.k_ref, x.tokens, x.scale)
            return _grads((out, loss), (x.dout, x.dloss), (x.q, x.k, x.v))
    return call
