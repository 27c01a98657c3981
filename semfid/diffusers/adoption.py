"""Which processors semfid stands in for, and how it keeps standing in when diffusers replaces them.

diffusers' processor APIs rebuild processors behind semfid's back: ``load_ip_adapter`` /
``unload_ip_adapter`` build ``type(old)()`` (a bare :class:`SemfidAttnProcessor`, no controller) on
self-attention layers and ``IPAdapterAttnProcessor2_0`` / ``AttnProcessor2_0`` on cross-attention;
``set_default_attn_processor`` and ``set_attention_slice(None)`` put stock processors everywhere;
``fuse_qkv_projections`` / attention slicing / xformers put processors semfid does not reproduce.
None of that runs through semfid, so the controller *adopts* at its next ``with`` block
(:meth:`SemfidController._check_processors`): each processor of a class semfid reproduces exactly
(:func:`stands_in_for`) is swapped for a semfid processor of that controller (the IP-Adapter one keeps
the adapter's weights), anything else on a chosen layer is an error naming the layer.

With no block active nothing is swapped: the UNet runs whatever diffusers put there.

Two more pieces make diffusers' own APIs accept an installed model:

* :func:`register_with_diffusers` adds semfid's classes to diffusers' ``CROSS_ATTENTION_PROCESSORS``
  (the exact-class list ``set_default_attn_processor`` checks), so that call works on an installed
  UNet and replaces every processor with ``AttnProcessor`` as it does on a stock one.
* :func:`stock_equivalent` is what a semfid processor deep-copies as (``AttnProcessor2_0``, or
  ``IPAdapterAttnProcessor2_0`` with copied adapter weights): ``copy.deepcopy`` of an installed UNet
  is a stock UNet (the controller's hook copies as a no-op).
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Optional

import torch
from diffusers.models import attention_processor as _ap

from .families.flux import SemfidFluxAttnProcessor
from .families.sd3 import SemfidJointAttnProcessor
from .ip_adapter import SemfidIPAdapterAttnProcessor
from .processors import SemfidAttnProcessor

#: IP-Adapter processor class names semfid reproduces exactly, besides each model family's own list
#: (``Family.replaceable``: ``AttnProcessor2_0``, ``AttnProcessor``, ``SemfidAttnProcessor`` for UNets)
IP_REPLACEABLE = ("IPAdapterAttnProcessor2_0", "SemfidIPAdapterAttnProcessor")
_STOCK_IP = _ap.IPAdapterAttnProcessor2_0


def adopt_ip(processor, name: str, owner: Any, active: bool) -> Optional[SemfidIPAdapterAttnProcessor]:
    """For an IP-Adapter processor (stock or semfid): a semfid one of ``owner`` sharing its weights;
    ``None`` for any other processor."""
    if type(processor) in (_STOCK_IP, SemfidIPAdapterAttnProcessor):
        return SemfidIPAdapterAttnProcessor.adopt(processor, name, owner, active)
    return None


def stands_in_for(processor, replaceable) -> bool:
    """Whether semfid reproduces ``processor`` exactly: its class name is in ``replaceable`` (the
    model family's list) or it is an IP-Adapter processor (:data:`IP_REPLACEABLE`)."""
    name = type(processor).__name__
    return name in replaceable or name in IP_REPLACEABLE


#: semfid's processors of each model family that know their stock equivalent (``.stock(memo)``)
_DIT_PROCESSORS = (SemfidJointAttnProcessor, SemfidFluxAttnProcessor)


#: diffusers' IP-Adapter processors of the diffusion transformers, which semfid does not stand in for
DIT_IP_PROCESSORS = ("SD3IPAdapterJointAttnProcessor2_0", "FluxIPAdapterAttnProcessor")


def _undo_hint(cls: str) -> str:
    """What to undo for a processor of class name ``cls`` that semfid cannot stand in for."""
    if cls in DIT_IP_PROCESSORS:
        return (f"semfid does not stand in for the SD3 / Flux IP-Adapter processors ({cls}): no maps "
                "or losses through an IP-Adapter on a diffusion transformer; call unload_ip_adapter() "
                "(the UNet IP-Adapter, IPAdapterAttnProcessor2_0, is supported).")
    return ("fuse_qkv_projections, attention slicing, xformers or a custom set_attn_processor ran: undo "
            "it (unfuse_qkv_projections(), set_attention_slice(None), set_default_attn_processor(), ...).")


def refuse_foreign(modules, replaceable, kind: str) -> None:
    """At ``install``: raise if a processor of ``modules`` ({layer name: attention module}) is one
    semfid does not reproduce exactly (``replaceable``: the model family's list; ``kind``: the model
    class name, for the message).

    Raises:
        ValueError: naming the first such layer, its processor class and what to undo.
    """
    foreign = [(n, type(m.processor).__name__) for n, m in modules.items()
               if not stands_in_for(m.processor, replaceable)]
    if foreign:
        name, cls = foreign[0]
        raise ValueError(
            f"unet has {len(foreign)} attention processor(s) that semfid cannot stand in for "
            f"(e.g. {name}: {cls}); install() reproduces only {list(replaceable[:-1])} on a "
            f"{kind} (and {', '.join(IP_REPLACEABLE[:-1])}). {_undo_hint(cls)} Then install()."
        )


def foreign_error(foreign, modules) -> RuntimeError:
    """At a block: the error for the layers to record (``foreign``: names) whose processor someone
    replaced by one semfid cannot record through (``modules``: {layer name: attention module})."""
    name = foreign[0]
    cls = type(modules[name].processor).__name__
    return RuntimeError(
        f"{len(foreign)} layer(s) to record run a processor semfid cannot record through (e.g. "
        f"{name}: {cls}); no maps or losses would be recorded. {_undo_hint(cls)} The next block puts "
        "semfid's processors back."
    )


def ownerless(processor) -> bool:
    """Whether ``processor`` is a semfid processor of no controller: diffusers' ``type(old)()``
    rebuilt it (``load_ip_adapter``, ``unload_ip_adapter``, ``set_attn_processor``); it runs the
    stock math, and ``uninstall`` puts its :func:`stock_equivalent` in its place."""
    return (isinstance(processor, (SemfidAttnProcessor,) + _DIT_PROCESSORS)
            and getattr(processor, "owner", None) is None)


def stock_equivalent(processor, memo: Optional[dict] = None):
    """The diffusers processor a semfid processor stands in for (others are returned as they are):
    ``AttnProcessor2_0``, ``IPAdapterAttnProcessor2_0``, SD3's ``JointAttnProcessor2_0``, Flux's
    ``FluxAttnProcessor`` (with the attention backend set on the semfid one).

    With ``memo`` (inside ``copy.deepcopy``) the IP-Adapter weights and Flux's backend settings are
    deep-copied, else shared.
    """
    if isinstance(processor, _DIT_PROCESSORS):
        return processor.stock(memo)
    if isinstance(processor, SemfidIPAdapterAttnProcessor):
        with torch.device("meta"):
            stock = _STOCK_IP(processor.hidden_size, processor.cross_attention_dim,
                              list(processor.num_tokens), 1.0)
        keep = (lambda m: copy.deepcopy(m, memo)) if memo is not None else (lambda m: m)
        stock.to_k_ip, stock.to_v_ip = keep(processor.to_k_ip), keep(processor.to_v_ip)
        stock.scale = list(processor.scale) if memo is not None else processor.scale
        stock.train(processor.training)
        return stock
    if isinstance(processor, SemfidAttnProcessor):
        return _ap.AttnProcessor2_0()
    return processor


_REGISTERED = (SemfidAttnProcessor, SemfidIPAdapterAttnProcessor)


def register_with_diffusers() -> None:
    """Add semfid's processor classes to diffusers' ``CROSS_ATTENTION_PROCESSORS``.

    diffusers' ``set_default_attn_processor`` accepts a model only when every processor's exact
    class is in that tuple; each diffusers module imported it by name, so the new tuple is bound in
    ``attention_processor`` (for modules imported later) and in every loaded ``diffusers`` module
    that holds the old one. Idempotent; changes nothing else.
    """
    old = getattr(_ap, "CROSS_ATTENTION_PROCESSORS", None)
    if old is None or all(c in old for c in _REGISTERED):
        return
    new = tuple(old) + tuple(c for c in _REGISTERED if c not in old)
    for mod_name, mod in list(sys.modules.items()):
        if mod_name.startswith("diffusers") and getattr(mod, "CROSS_ATTENTION_PROCESSORS", None) is old:
            mod.CROSS_ATTENTION_PROCESSORS = new


def _no_hook(module, args, kwargs):
    """What the controller's forward pre-hook deep-copies as: nothing (the copy is stock)."""
    return None


class PreHook:
    """The controller's UNet forward pre-hook; ``copy.deepcopy`` of the UNet copies it as a no-op."""

    def __init__(self, fn):
        self._fn = fn

    def __call__(self, module, args, kwargs):
        return self._fn(module, args, kwargs)

    def __deepcopy__(self, memo):
        return _no_hook


__all__ = ["IP_REPLACEABLE", "DIT_IP_PROCESSORS", "adopt_ip", "stands_in_for", "refuse_foreign",
           "foreign_error", "ownerless", "stock_equivalent", "register_with_diffusers", "PreHook"]
