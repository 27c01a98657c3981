"""Random inputs of one attention layer of a diffusion transformer at 1024 px (B = 1), as diffusers
hands them to a processor: the GPU tests and timings of the key-blocked kernels share them.

* ``flux``:   Flux.1 double-stream block, joint keys [512 text, 4096 image], 24 heads x 128;
* ``sd3``:    SD3's joint block, keys [4096 image, 333 text], 24 heads x 64;
* ``pixart``: PixArt-Σ cross-attention, 4096 image queries over 300 text keys, 16 heads x 72.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch

Tensor = torch.Tensor

#: name -> (heads, head dim, text tokens, image tokens, text_first); text_first None: cross-attention
DIT_LAYERS: Dict[str, Tuple[int, int, int, int, Optional[bool]]] = {
    "flux": (24, 128, 512, 4096, True),
    "sd3": (24, 64, 333, 4096, False),
    "pixart": (16, 72, 300, 4096, None),
}


class DitLayer(NamedTuple):
    """q [1, H, N, D], k / v [1, H, M, D] and k_ref [1, H, text + 9, D] (a reference text of another
    length), each a transposed view of [1, n, H, D] memory requiring grad; ``tokens`` [1, 4] four
    text positions on the key axis; ``rows`` the image queries (None: all) and ``segment`` the text
    keys k_ref replaces (None: all), as ``map_queries`` / ``ref_segment`` take them."""
    q: Tensor
    k: Tensor
    v: Tensor
    k_ref: Tensor
    tokens: Tensor
    rows: Optional[Tuple[int, int]]
    segment: Optional[Tuple[int, int]]


def dit_layer(name: str, dtype: torch.dtype, device: str = "cuda", seed: int = 0) -> DitLayer:
    """The inputs of layer ``name`` (a key of :data:`DIT_LAYERS`), drawn from a seeded generator."""
    H, D, text, image, text_first = DIT_LAYERS[name]
    joint = text_first is not None
    N, M = (text + image, text + image) if joint else (image, text)
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(n: int) -> Tensor:
        return torch.randn(1, n, H, D, device=device, generator=gen).to(dtype).transpose(1, 2).requires_grad_()

    t0 = image if joint and not text_first else 0
    rows = ((text, text + image) if text_first else (0, image)) if joint else None
    segment = (t0, t0 + text) if joint else None
    tokens = torch.tensor([[t0 + 3, t0 + 7, t0 + 11, t0 + 12]], device=device)
    return DitLayer(rand(N), rand(M), rand(M), rand(text + 9), tokens, rows, segment)


__all__ = ["DIT_LAYERS", "DitLayer", "dit_layer"]
