"""Everything attn_speed times: semfid's public ops per backend, then the baselines.

semfid is called only through its public API (``cross_attention`` / ``subject_attention`` with
``backend=`` fixed): whether a backend can run here is asked by calling it on the reference gate's
small case, so the benchmark never depends on semfid's private modules.
"""

from __future__ import annotations

import sys
from typing import List, Optional

import torch

from _bench_utils import short_error
from attn_cases import CHECK_SHAPE, make_inputs
from baselines import Implementation, baseline_implementations


def semfid_implementation(backend: str) -> Implementation:
    """semfid's public ops with ``backend=`` fixed; named ``semfid`` for auto, ``semfid_<b>`` else."""
    import semfid

    def forward(q, k, v, scale):
        return semfid.cross_attention(q, k, v, scale=scale, backend=backend)

    def forward_maps(q, k, v, tokens, scale):
        return semfid.cross_attention(q, k, v, scale=scale, select=tokens, head_reduce="mean",
                                      backend=backend)

    def subject(q, k, v, k_ref, tokens, scale):
        return semfid.subject_attention(q, k, v, k_ref, tokens=tokens, scale=scale,
                                        head_reduce="mean", backend=backend)

    def unavailable(device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """None when semfid's dispatcher takes a small input of this device and dtype, else why not
        (its ValueError lists the backend's reasons)."""
        x = make_inputs(**CHECK_SHAPE, device=device, dtype=dtype)
        try:
            with torch.no_grad():
                semfid.cross_attention(x.q, x.k, x.v, scale=x.scale, select=x.tokens,
                                       head_reduce="mean", backend=backend)
        except (ValueError, NotImplementedError) as exc:
            return short_error(exc)
        return None

    name = "semfid" if backend == "auto" else f"semfid_{backend}"
    return Implementation(name, forward, forward_maps, subject, f"semfid, backend={backend!r}",
                          unavailable=unavailable)


def all_implementations() -> List[Implementation]:
    """semfid (auto), one semfid_<backend> per available backend, then the baselines."""
    try:
        import semfid

        backends = ["auto"] + list(semfid.available_backends())
    except Exception as exc:  # noqa: BLE001 - report instead of dying: the baselines still run
        print(f"warning: import semfid failed ({exc}); timing the baselines only", file=sys.stderr)
        backends = []
    return [semfid_implementation(b) for b in backends] + baseline_implementations()
