"""Drop-in diffusers processors: attention-map capture, SeFi-IDE subject loss, K/V-split text states.

``from semfid.diffusers import install``; see :mod:`semfid.diffusers.controller` for usage.
Needs diffusers: ``pip install 'semfid[diffusers]'``.
"""

try:
    import diffusers as _diffusers  # noqa: F401
    from diffusers.models.attention_processor import Attention as _Attention  # noqa: F401
except ImportError as _exc:  # pragma: no cover - exercised only without diffusers
    raise ImportError(
        "semfid.diffusers needs the `diffusers` package (UNet2DConditionModel with legacy "
        f"Attention blocks): pip install 'semfid[diffusers]'  ({_exc})"
    ) from _exc

from .alignment import AlignedTokens, align_joint_tokens, align_tokens
from .controller import SemfidController, install
from .families import cross_attention_layers
from .layers import layer_levels, resolve_layers
from .recorders import AttentionRecorder, NoCallError, SubjectLossRecorder
from .processors import SemfidAttnProcessor

__all__ = [
    "install",
    "SemfidController",
    "SemfidAttnProcessor",
    "AttentionRecorder",
    "SubjectLossRecorder",
    "NoCallError",
    "AlignedTokens",
    "align_tokens",
    "align_joint_tokens",
    "cross_attention_layers",
    "layer_levels",
    "resolve_layers",
]
