"""What every model family shares: the interface the controller drives, and the module walk.

A *family* (:class:`Family`) knows, for one kind of diffusers model, everything that differs between
kinds: which argument of ``forward`` carries the latents and which dict carries per-call kwargs to
the processors, which attention layers attend to the text, which processor classes semfid can stand
in for, which semfid processor goes on each layer, and the query grid of each layer for a call.
:class:`~semfid.diffusers.controller.SemfidController` does the rest the same way for every family.
A family instance holds only static facts of the model it was built for (patch size, levels), never
the model itself.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch

Grid = Tuple[int, int]
#: ``get(name)``: an argument of the model call by name (positional or keyword), ``None`` if absent
ArgGetter = Callable[[str], Any]

_PROCESSOR_SUFFIX = ".processor"


def processor_modules(model: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    r"""Every module of ``model`` that holds an attention processor, by layer name.

    Both diffusers' legacy ``Attention`` and the newer ``AttentionModuleMixin`` classes (Flux) have
    ``processor`` and ``set_processor``; the names are the keys of ``model.attn_processors`` without
    ``.processor``, in ``named_modules`` order.
    """
    return {name: m for name, m in model.named_modules()
            if name and hasattr(m, "set_processor") and hasattr(m, "processor")}


def latent_grid(latent: Any, patch: int) -> Optional[Grid]:
    """(h, w) of the patch grid of a [B, C, H, W] latent: (H // patch, W // patch)."""
    if isinstance(latent, torch.Tensor) and latent.dim() == 4:
        return latent.shape[-2] // patch, latent.shape[-1] // patch
    return None


class Family:
    r"""One kind of diffusers model, as the controller sees it (subclasses fill it in).

    Attributes:
        name (`str`): ``"unet"``, ``"sd3"``, ``"flux"`` or ``"pixart"``.
        latent_arg (`str`): the ``forward`` argument with the latents (``sample`` / ``hidden_states``).
        kwargs_arg (`str`): the ``forward`` dict handed to every processor
            (``cross_attention_kwargs`` / ``joint_attention_kwargs``).
        replaceable (`tuple[str]`): processor class names semfid reproduces exactly.
        joint (`bool`): the text keys are part of a joint [image, text] / [text, image] key set.
    """

    name: str = ""
    latent_arg: str = "sample"
    kwargs_arg: str = "cross_attention_kwargs"
    replaceable: Tuple[str, ...] = ()
    joint: bool = False

    def __init__(self, model: torch.nn.Module):
        pass

    def text_layers(self, modules: Dict[str, torch.nn.Module]) -> Dict[str, torch.nn.Module]:
        """The layers whose keys include the text (those semfid can capture / compute losses in)."""
        raise NotImplementedError

    def make_processor(self, name: str, module: torch.nn.Module, owner: object, active: bool):
        """A fresh semfid processor for layer ``name`` (``active``: chosen for maps / losses)."""
        raise NotImplementedError

    def grids(self, get: ArgGetter, names) -> Dict[str, Optional[Grid]]:
        """The query grid (h, w) of each of ``names`` for the call whose arguments ``get`` reads."""
        raise NotImplementedError

    def call_kwargs(self, get: ArgGetter) -> Dict[str, Any]:
        """Extra per-call kwargs for the processors besides ``semfid_call`` (none by default)."""
        return {}

    def text_len_kwargs(self, text_len: int) -> Dict[str, Any]:
        """Kwargs telling processors that cannot see it the text length of a call (Flux single)."""
        return {}

    def reference_call(self, call: Dict[str, Any], ref_len: int) -> Dict[str, Any]:
        """Arguments of the reference pass that differ from ``call`` besides the text states."""
        return {}

    def key_width(self, module: torch.nn.Module) -> int:
        """Width C of the text states a layer's key projection reads (reference states)."""
        return module.to_k.in_features

    def value_width(self, module: torch.nn.Module) -> int:
        """Width C of the text states a layer's value projection reads (``values`` blocks)."""
        return module.to_v.in_features


__all__ = ["Family", "ArgGetter", "Grid", "processor_modules", "latent_grid"]
