"""Where a model's ``forward`` takes its arguments, for the controller's forward pre-hook.

diffusers models are called both with keywords and positionally (pipelines pass the latents first,
training scripts often pass everything positionally), so the hook reads an argument, and puts an
updated ``*_attention_kwargs`` dict back, wherever the call put it.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Sequence, Tuple

import torch


class ForwardArgs:
    r"""The parameter positions of ``model.forward``, checked to include ``needed``.

    Args:
        model (`torch.nn.Module`): the model the pre-hook sits on.
        needed (`Sequence[str]`): parameters the hook reads (the latent input,
            ``encoder_hidden_states``, the family's attention-kwargs dict).
        family_name (`str`): the model family, for the error message.

    Raises:
        ValueError: ``model.forward`` lacks one of ``needed``.
    """

    def __init__(self, model: torch.nn.Module, needed: Sequence[str], family_name: str):
        try:
            params = list(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):
            params = []
        kind = type(model).__name__
        for name in needed:
            if name not in params:
                raise ValueError(f"unet.forward must take `{name}` (a diffusers {family_name} model "
                                 f"does); {kind}.forward takes {params}")
        self._index = {p: i for i, p in enumerate(params)}

    def get(self, args: tuple, kwargs: dict, name: str) -> Any:
        """The value of parameter ``name`` in this call, or ``None`` when not passed."""
        if name in kwargs:
            return kwargs[name]
        i = self._index.get(name, len(args))
        return args[i] if i < len(args) else None

    def named(self, args: tuple, kwargs: dict) -> Dict[str, Any]:
        """Every argument of this call by parameter name."""
        named = {p: args[i] for p, i in self._index.items() if i < len(args)}
        named.update(kwargs)
        return named

    def replace(self, args: tuple, kwargs: dict, name: str, value: Any) -> Tuple[tuple, dict]:
        """(args, kwargs) with parameter ``name`` set to ``value``, where the call passed it
        (keyword when it was not passed at all)."""
        i = self._index[name]
        if name not in kwargs and i < len(args):
            return args[:i] + (value,) + args[i + 1:], kwargs
        kwargs = dict(kwargs)
        kwargs[name] = value
        return args, kwargs
