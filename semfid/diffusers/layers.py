"""Naming, filtering and spatial resolution of the attention layers of a diffusers UNet.

A *layer name* is the key of ``unet.attn_processors`` without the trailing ``.processor``, e.g.
``down_blocks.1.attentions.0.transformer_blocks.0.attn2``. SD1.5 has 16 cross-attention (``attn2``)
layers, SDXL base 70. ``unet.attn_processors`` lists them down → up → mid, which is *not* the
order they run in (down → mid → up): everything here is indexed by name, never by position.
Which layers attend to the text, for every model family (UNet, PixArt, SD3, Flux), is
:func:`semfid.diffusers.families.cross_attention_layers`.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

LayerFilter = Union[None, str, Iterable[str], Callable[[str], bool]]

_PROCESSOR_SUFFIX = ".processor"


def layer_levels(unet: torch.nn.Module, names: Iterable[str]) -> Dict[str, Optional[int]]:
    r"""How many times the latent was downsampled before each named layer runs.

    Derived from the block structure of a ``UNet2DConditionModel`` (``down_blocks[i].downsamplers``,
    ``up_blocks[i].upsamplers``): SD1.5's ``down_blocks.0`` layers are at level 0 (64×64 for a
    512 px image), ``mid_block`` at level 3 (8×8). ``None`` for a name outside those blocks.
    """
    down = getattr(unet, "down_blocks", None)
    up = getattr(unet, "up_blocks", None)
    block_level: Dict[str, int] = {}
    level = 0
    if down is not None:
        for i, block in enumerate(down):
            block_level[f"down_blocks.{i}"] = level
            if getattr(block, "downsamplers", None) is not None:
                level += 1
    block_level["mid_block"] = level
    if up is not None:
        for i, block in enumerate(up):
            block_level[f"up_blocks.{i}"] = level
            if getattr(block, "upsamplers", None) is not None:
                level -= 1
    out: Dict[str, Optional[int]] = {}
    for name in names:
        parts = name.split(".")
        key = parts[0] if parts[0] == "mid_block" else ".".join(parts[:2])
        out[name] = block_level.get(key)
    return out


def grid_size(height: int, width: int, level: Optional[int]) -> Optional[Tuple[int, int]]:
    r"""Spatial size (h, w) of a layer at ``level`` for a latent of ``height`` × ``width``.

    Each diffusers ``Downsample2D`` is a stride-2 3×3 convolution with padding 1, so one level
    maps a side ``s`` to ``ceil(s / 2)``; the up path restores the sizes of the skip connections.
    """
    if level is None:
        return None
    h, w = int(height), int(width)
    for _ in range(level):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def resolve_layers(spec: LayerFilter, names: Sequence[str], *, arg: str = "layers") -> List[str]:
    r"""Turn a layer filter into the list of chosen names (in the order of ``names``).

    Args:
        spec: ``None`` (all of ``names``), one layer name, an iterable of layer names, or a
            predicate ``f(name) -> bool``.
        names (`Sequence[str]`): the names the filter chooses from.
        arg (`str`): the argument name used in error messages.

    Raises:
        TypeError: ``spec`` is none of the accepted kinds.
        ValueError: a listed name is not one of ``names`` (a ``.processor`` suffix is tolerated),
            or the filter chooses nothing.
    """
    if spec is None:
        chosen = list(names)
    elif callable(spec) and not isinstance(spec, str):
        chosen = [n for n in names if spec(n)]
    else:
        if isinstance(spec, str):
            wanted = [spec]
        else:
            try:
                wanted = list(spec)
            except TypeError:
                raise TypeError(
                    f"{arg} must be None, a layer name, a list of layer names or a predicate on the "
                    f"name, got {type(spec).__name__}"
                ) from None
        cleaned = []
        for w in wanted:
            if not isinstance(w, str):
                raise TypeError(f"{arg} must hold layer names (str), got {type(w).__name__}: {w!r}")
            cleaned.append(w[: -len(_PROCESSOR_SUFFIX)] if w.endswith(_PROCESSOR_SUFFIX) else w)
        known = set(names)
        unknown = [w for w in cleaned if w not in known]
        if unknown:
            sample = ", ".join(list(names)[:3])
            raise ValueError(
                f"{arg} names layers that are not available here: {unknown}. "
                f"Expected names like {sample} (there are {len(names)})."
            )
        keep = set(cleaned)
        chosen = [n for n in names if n in keep]
    if not chosen:
        raise ValueError(
            f"{arg} matches none of the {len(names)} available cross-attention layers "
            f"(e.g. {', '.join(list(names)[:2])})"
        )
    return chosen


__all__ = [
    "LayerFilter",
    "layer_levels",
    "grid_size",
    "resolve_layers",
]
