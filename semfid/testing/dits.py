"""The transformer configs of SD3 medium, SD3.5 large / medium, Flux.1 dev and PixArt-Σ, and their
structural twins, with nothing downloaded.

``testing/configs/`` beside this file holds, for each model, the full-size config (for benchmarks at
real shapes with random weights) and a ``*_twin`` (the same block layout and attention layer names:
24 / 38 joint blocks, SD3.5 medium's 13 extra self-attention layers, Flux's 19 double- and 38
single-stream blocks, PixArt-Σ's 28 ``attn2`` layers; two heads of width 8 or 16, text width 32), for
fast CPU tests and the tiny pipelines of :mod:`semfid.testing.tiny_dit`.
"""

from __future__ import annotations

from .unets import load_shipped_config

DIT_MODELS = ("sd3_medium", "sd35_large", "sd35_medium", "flux_dev", "pixart_sigma")
DIT_CONFIGS = tuple(f"{m}_transformer{t}" for m in DIT_MODELS for t in ("", "_twin"))


def load_dit_config(name: str) -> dict:
    r"""One of the shipped transformer configs as a (fresh) dict, ``_class_name`` included.

    Args:
        name (`str`): one of :data:`DIT_CONFIGS`, e.g. ``"flux_dev_transformer_twin"``; a ``.json``
            suffix is accepted.

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: ``name`` is not one of :data:`DIT_CONFIGS`.
    """
    return load_shipped_config(name, DIT_CONFIGS)


def dit_from_config(name: str, **overrides):
    r"""A randomly initialised diffusers transformer from a shipped config (nothing downloaded).

    Args:
        name (`str`): see :func:`load_dit_config`.
        **overrides: config entries to change (e.g. ``sample_size=32``).

    Returns:
        ``SD3Transformer2DModel``, ``FluxTransformer2DModel`` or ``PixArtTransformer2DModel``.
    """
    import diffusers

    config = load_dit_config(name)
    cls = getattr(diffusers, config.pop("_class_name"))
    config.update(overrides)
    return cls.from_config(config)


__all__ = ["DIT_MODELS", "DIT_CONFIGS", "load_dit_config", "dit_from_config"]
