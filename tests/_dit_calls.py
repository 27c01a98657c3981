"""Tiny DiT twins and one model call for each, shared by the tests/test_dit_*.py files."""

from __future__ import annotations

import torch

from semfid.testing.dits import dit_from_config

#: family → twin config
TWINS = {"sd3": "sd35_medium_transformer_twin", "flux": "flux_dev_transformer_twin",
         "pixart": "pixart_sigma_transformer_twin"}


def flux_ids(h: int, w: int) -> torch.Tensor:
    """Flux's img_ids [h·w, 3]: (0, row, column) of each packed latent."""
    rows, cols = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)


def make_call(family: str, batch: int = 2, text: int = 7, h: int = 4, w: int = 6) -> dict:
    """Keyword arguments of one call of the ``family`` twin: an h × w patch grid, ``text`` tokens."""
    t = torch.rand(batch)
    if family == "sd3":  # patch 2: latent 2h × 2w
        return dict(hidden_states=torch.randn(batch, 4, 2 * h, 2 * w),
                    encoder_hidden_states=torch.randn(batch, text, 32),
                    pooled_projections=torch.randn(batch, 32), timestep=t * 1000)
    if family == "flux":
        return dict(hidden_states=torch.randn(batch, h * w, 16), encoder_hidden_states=torch.randn(batch, text, 32),
                    pooled_projections=torch.randn(batch, 32), timestep=t, img_ids=flux_ids(h, w),
                    txt_ids=torch.zeros(text, 3), guidance=torch.full((batch,), 3.5))
    if family == "pixart":
        return dict(hidden_states=torch.randn(batch, 4, 2 * h, 2 * w),
                    encoder_hidden_states=torch.randn(batch, text, 32), timestep=t * 1000,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    raise ValueError(family)


def twin(family: str) -> torch.nn.Module:
    return dit_from_config(TWINS[family]).eval()
