r"""Attention-map losses of personalisation methods, on maps semfid captured (differentiably).

Each loss reads a recorder of :mod:`semfid.diffusers` — ``ctl.capture(...)`` under grad mode, or
``ctl.subject_loss(..., keep_maps=True)`` (the maps then come from the same fused pass as the
SeFi-IDE loss) — or anything with the same ``maps`` ({layer: [B, N, S] or [B, H, N, S]}) and
``grids`` ({layer: (h, w)}) attributes. Masks are given once at image resolution and resized to
each layer's query grid.

* :func:`mask_mse_loss` — Break-A-Scene's cross-attention loss: MSE between each subject token's
  (max-normalised) map and its subject mask.
* :func:`balanced_l1_loss` — FastComposer's localisation loss: mean attention outside the mask
  minus mean attention inside it.
* :func:`max_attention_loss` — Attend-and-Excite's loss: ``1 − max`` of each subject token's
  (renormalised, smoothed) map at one resolution, the worst token per image.

All return a [B] tensor (one value per batch row); ``.mean()`` it for a scalar.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _columns(columns: Optional[Sequence[int]], s: int, arg: str = "columns") -> list:
    cols = list(range(s)) if columns is None else list(columns)
    if not cols or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < s for c in cols):
        raise ValueError(f"{arg} must be non-empty column indices in [0, {s}) of the captured tokens, got {columns!r}")
    return cols


def _masks(masks: Tensor, batch: int, k: int, dtype: torch.dtype) -> Tensor:
    """[B, K, H, W] or [B, H, W] (one subject) masks, checked, as [B, K, H, W] in the maps' dtype."""
    if not isinstance(masks, Tensor) or masks.dim() not in (3, 4):
        raise ValueError(f"masks must be a [B, K, H, W] (or [B, H, W]) tensor, got {getattr(masks, 'shape', masks)!r}")
    m = masks if masks.dim() == 4 else masks[:, None]
    if m.shape[0] != batch or m.shape[1] != k:
        raise ValueError(f"masks must have batch {batch} and one mask per selected column ({k}), "
                         f"got shape {tuple(masks.shape)}")
    return m.to(device=m.device, dtype=dtype)


def _resize(m: Tensor, grid) -> Tensor:
    """[B, K, H, W] → [B, N, K] at the layer's (h, w) grid (bilinear, antialiased when shrinking)."""
    small = F.interpolate(m, size=tuple(grid), mode="bilinear", align_corners=False,
                          antialias=grid[0] < m.shape[-2])
    return small.flatten(2).transpose(1, 2)


def _layers(rec):
    maps, grids = rec.maps, rec.grids
    if not maps:
        raise ValueError("the recorder holds no maps")
    return [(maps[n], grids[n]) for n in maps]


def mask_mse_loss(rec, masks: Tensor, columns: Optional[Sequence[int]] = None, *,
                  normalize: bool = True) -> Tensor:
    r"""Break-A-Scene's cross-attention loss, per layer, averaged over layers.

    ``loss[b] = mean_layers mean_{n, k} (Â[b, n, k] − mask_k[b, n])²`` with ``Â`` the head-mean map
    of captured column ``columns[k]``, divided by its maximum over positions when ``normalize``.

    Args:
        rec: a recorder with differentiable maps (see the module docstring).
        masks (`Tensor` [B, K, H, W] or [B, H, W]): subject masks in [0, 1], one per column.
        columns (*optional*): K captured-column indices (default: every captured column).
        normalize (`bool`, *optional*, defaults to True): max-normalise each map first.
    """
    total = []
    for a, grid in _layers(rec):
        a = a.mean(dim=1) if a.dim() == 4 else a  # [B, N, S]
        cols = _columns(columns, a.shape[-1])
        a = a[..., cols]
        if normalize:
            a = a / a.amax(dim=1, keepdim=True).clamp_min(1e-12)
        m = _resize(_masks(masks, a.shape[0], len(cols), a.dtype).to(a.device), grid)
        total.append((a - m).pow(2).mean(dim=(1, 2)))
    return torch.stack(total).mean(dim=0)


def balanced_l1_loss(rec, masks: Tensor, columns: Optional[Sequence[int]] = None) -> Tensor:
    r"""FastComposer's balanced L1 localisation loss, per layer (and head), averaged.

    ``l[b, (h), k] = Σ_n A·(1 − m) / Σ_n (1 − m) − Σ_n A·m / Σ_n m`` per captured column
    ``columns[k]`` with mask ``m`` resized to the layer grid; averaged over heads, columns, layers.
    Per-head maps (``head_reduce="none"``) are penalised per head, as FastComposer does.
    """
    total = []
    for a, grid in _layers(rec):
        cols = _columns(columns, a.shape[-1])
        a = a[..., cols]  # [B, (H,) N, K]
        m = _resize(_masks(masks, a.shape[0], len(cols), a.dtype).to(a.device), grid)
        if a.dim() == 4:
            m = m[:, None]
        bg = 1 - m
        outside = (a * bg).sum(dim=-2) / bg.sum(dim=-2).clamp_min(1e-12)
        inside = (a * m).sum(dim=-2) / m.sum(dim=-2).clamp_min(1e-12)
        total.append((outside - inside).flatten(1).mean(dim=1))
    return torch.stack(total).mean(dim=0)


def _gaussian_smooth(x: Tensor, sigma: float) -> Tensor:
    """3x3 Gaussian blur of [B, K, h, w] with reflect padding (Attend-and-Excite's smoothing)."""
    r = torch.arange(3, dtype=x.dtype, device=x.device) - 1
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    k2 = torch.outer(g, g)
    k2 = (k2 / k2.sum()).expand(x.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), k2, groups=x.shape[1])


def max_attention_loss(rec, subject: Sequence[int], *, text: Optional[Sequence[int]] = None,
                       res: int = 16, temperature: float = 100.0, smooth: bool = True,
                       sigma: float = 0.5) -> Tensor:
    r"""Attend-and-Excite's loss ``max_k (1 − max_{x,y} Ã_k)⁺`` per image.

    The maps of the layers at ``res`` are averaged (``rec.aggregate(res)``). With ``text`` (the
    captured columns of the prompt's words, without start / end tokens) they are renormalised as
    Attend-and-Excite does, ``softmax(temperature · A[text])`` over those columns; each subject
    column's map is then smoothed (3×3 Gaussian, ``sigma``) and its maximum taken.

    Args:
        rec: a recorder with differentiable maps.
        subject: captured-column indices of the tokens to excite (within ``text`` when given).
        text (*optional*): captured-column indices to renormalise over.
        res (`int`, *optional*, defaults to 16): the grid to aggregate.
    """
    heat = rec.aggregate(res)  # [B, S, h, w]
    s = heat.shape[1]
    subj = _columns(subject, s, "subject")
    if text is not None:
        txt = _columns(text, s, "text")
        missing = [c for c in subj if c not in txt]
        if missing:
            raise ValueError(f"subject columns {missing} are not among the text columns {txt}")
        b, _, h, w = heat.shape
        a = torch.softmax(temperature * heat[:, txt].flatten(2), dim=1).reshape(b, len(txt), h, w)
        heat = a[:, [txt.index(c) for c in subj]]
    else:
        heat = heat[:, subj]
    if smooth:
        heat = _gaussian_smooth(heat, sigma)
    peak = heat.flatten(2).amax(dim=-1)  # [B, K]
    return (1 - peak).clamp_min(0).amax(dim=1)


__all__ = ["mask_mse_loss", "balanced_l1_loss", "max_attention_loss"]
