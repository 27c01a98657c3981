"""Install semfid processors on a diffusers UNet and drive them: map capture, subject loss, K/V split.

Usage::

    from semfid.diffusers import align_tokens, install

    ctl = install(unet)                                    # every attn2 layer; layers=... filters
    with ctl.capture(tokens=[5, 6]) as rec:                # maps during generation
        unet(latents, t, encoder_hidden_states=ehs)
    heat = rec.aggregate(res=16)                           # [B, S, 16, 16]

    aligned = align_tokens(tokenizer, prompts, "sks", "dog")   # per-row tokens / ref_tokens
    with ctl.subject_loss(ref_states, aligned) as rec:     # training; ragged rows are fine
        pred = unet(noisy, t, encoder_hidden_states=key_states).sample
    (mse(pred, noise) + 0.003 * rec.loss.mean()).backward()   # after the block: fine

    with ctl.capture([1, 2, 3], accumulate="mean") as rec: # every call of a pipeline run
        image = pipe(prompt).images[0]
    rec.save_heatmaps("out-maps.png", image, row=1)        # one labelled grid (CFG: row 1 = cond)

    with ctl.values(value_states):                         # K/V-disentangled text states
        unet(latents, t, encoder_hidden_states=key_states)
    ctl.uninstall()                                        # the previous processors, as they were

How state reaches the processors (a forward pre-hook, one validated per-call state in
``cross_attention_kwargs["semfid_call"]``, safe under gradient checkpointing and per thread):
ARCHITECTURE.md, "Per-call state".

Limits:

* A second UNet call in a ``subject_loss`` block replaces the losses of the first
  (``rec.num_calls`` counts them); ``capture(..., accumulate="mean" | "list")`` keeps every call.
* Wrapping the *whole* UNet call in ``torch.utils.checkpoint`` (instead of
  ``unet.enable_gradient_checkpointing()``) re-runs the hook during backward, outside the block:
  don't.
* ``torch.compile``: ``fullgraph=True`` works with a block active and compiles once per *shape
  class* (not per step or per block); what does recompile, and why, is in ARCHITECTURE.md,
  "Under torch.compile".
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Dict, List, Optional, Tuple

import torch

from .._inputs import TokensLike
from .adoption import (PreHook, adopt_ip, foreign_error, ownerless, refuse_foreign,
                       register_with_diffusers, stands_in_for, stock_equivalent)
from .blocks import capture_block, subject_loss_block, values_block
from .families import detect_family, processor_modules
from .forward_args import ForwardArgs
from .families.reference import KEYS_KWARG as REF_KEYS_KWARG, reference_keys
from .layers import LayerFilter, resolve_layers
from .processors import CALL_KWARG
from .recorders import AttentionRecorder, SubjectLossRecorder
from .requests import LossRequest, Request, StatesLike, plan_call

Tensor = torch.Tensor

# ------------------------------------------------------------------------------------------------
# the controller
# ------------------------------------------------------------------------------------------------
class _ThreadState(threading.local):
    """Per-thread state of a controller. ``threading.local`` runs ``__init__`` in every thread
    that touches it, so both attributes always exist: a compiled model's guards on them then
    compare values, not whether the attribute exists (which the first reference pass of a joint
    model would otherwise change, recompiling the next step)."""

    def __init__(self):
        self.frames: Tuple = ()
        self.in_reference = False


class _Owner:
    """Identity token shared by a controller and its processors (no reference back to the UNet)."""

    __slots__ = ("__weakref__",)


class SemfidController:
    r"""Handle returned by :func:`install`; see the module docstring for the whole picture.

    Attributes:
        layers (`list[str]`): the cross-attention layers chosen at install, in module order.
        cross_attention_layers (`list[str]`): every cross-attention layer of the UNet.
    """

    def __init__(self, unet: torch.nn.Module, layers: LayerFilter = None):
        family = detect_family(unet)
        kind = type(unet).__name__
        modules = processor_modules(unet)
        cross = family.text_layers(modules)
        if not cross:
            raise ValueError(f"unet ({kind}) has no attention layers whose keys include the text to install on")
        self._args = ForwardArgs(unet, (family.latent_arg, "encoder_hidden_states", family.kwargs_arg),
                                 family.name)
        self._family = family
        refuse_foreign(modules, family.replaceable, kind)
        stale = getattr(unet, "_semfid_controller", None)
        stale = stale() if stale is not None else None
        if stale is not None and stale.installed and stale._unet_ref() is unet:  # not a deepcopy's
            if stale._processors_intact():
                raise ValueError(
                    "unet already has semfid processors installed; call uninstall() on that "
                    "controller first"
                )
            stale._detach()  # its processors were replaced: only its hook is left to remove

        self.cross_attention_layers: List[str] = list(cross)
        self.layers: List[str] = resolve_layers(layers, self.cross_attention_layers, arg="layers")
        self._unet_ref = weakref.ref(unet)
        self._owner = _Owner()
        self._modules = modules
        self._saved = {n: m.processor for n, m in modules.items()}
        chosen = set(self.layers)
        self._chosen = chosen
        self._processors = {n: self._new_processor(n, m) for n, m in modules.items()}
        self._k_width = {n: family.key_width(cross[n]) for n in self.layers}
        self._v_width = {n: family.value_width(cross[n]) for n in self.layers}
        self._local = _ThreadState()
        self._lock = threading.Lock()
        for n, m in modules.items():
            m.set_processor(self._processors[n])
        register_with_diffusers()  # diffusers' set_default_attn_processor accepts semfid's classes
        self._hook = unet.register_forward_pre_hook(PreHook(self._pre_hook), with_kwargs=True)
        unet._semfid_controller = weakref.ref(self)
        self.installed = True

    # ---- install state ------------------------------------------------------------------------
    def _processors_intact(self, names=None) -> bool:
        names = self._processors if names is None else names
        return all(self._modules[n].processor is self._processors[n] for n in names)

    def _new_processor(self, name: str, module):
        """This controller's processor for layer ``name``: the IP-Adapter one if ``module`` holds an
        IP-Adapter processor, else the model family's."""
        active = name in self._chosen
        ip = adopt_ip(module.processor, name, self._owner, active)
        return ip if ip is not None else self._family.make_processor(name, module, self._owner, active)

    def _check_processors(self, names) -> None:
        """Before a block / a call in a block: every layer still runs a processor of this controller.

        A layer whose processor diffusers replaced by one semfid reproduces exactly (``load_ip_adapter``,
        ``unload_ip_adapter``, ``set_default_attn_processor``, ``set_attn_processor(AttnProcessor2_0())``,
        ...) gets a processor of this controller again (``adoption``); anything else on one of
        ``names`` (the layers to record) is an error naming the layer.
        """
        if not self.installed:
            raise RuntimeError("this semfid controller was uninstalled; call semfid.diffusers.install(unet) again")
        if all(m.processor is self._processors[n] for n, m in self._modules.items()):
            return
        foreign = []
        for n, m in self._modules.items():
            proc = m.processor
            if proc is self._processors[n]:
                continue
            if stands_in_for(proc, self._family.replaceable):
                self._saved[n] = stock_equivalent(proc)  # what uninstall() puts back on this layer
                self._processors[n] = self._new_processor(n, m)
                m.set_processor(self._processors[n])
            elif n in names:
                foreign.append(n)
        if foreign:
            raise foreign_error(foreign, self._modules)

    def _detach(self) -> None:
        self._hook.remove()
        self.installed = False

    def uninstall(self) -> None:
        r"""Put back exactly the processor objects that were there before :func:`install`.

        Layers whose semfid processor someone else replaced keep that replacement (a semfid processor
        of no controller, diffusers' ``type(old)()``, becomes its stock equivalent). Twice: a no-op.
        """
        with self._lock:
            if not self.installed:
                return
            for n, m in self._modules.items():
                if m.processor is self._processors[n]:
                    m.set_processor(self._saved[n])
                elif ownerless(m.processor):
                    m.set_processor(stock_equivalent(m.processor))  # diffusers' type(old)() copies
            self._detach()
            unet = self._unet_ref()
            if unet is not None and getattr(unet, "_semfid_controller", lambda: None)() is self:
                del unet._semfid_controller

    # ---- per-thread active requests ------------------------------------------------------------
    def _frames(self) -> Tuple[Request, ...]:
        return self._local.frames

    def _push(self, request: Request) -> None:
        frames = self._frames()
        if isinstance(request, LossRequest) and any(isinstance(f, LossRequest) for f in frames):
            raise RuntimeError("subject_loss blocks of one controller cannot be nested")
        self._local.frames = frames + (request,)

    def _pop(self, request: Request) -> None:
        self._local.frames = tuple(f for f in self._frames() if f is not request)

    # ---- the UNet pre-hook: one validation per UNet call -----------------------------------------
    def _pre_hook(self, module, args, kwargs):
        frames = self._frames()
        if not frames or self._local.in_reference:  # none, or the reference pass
            return None
        names = set().union(*(f.layers for f in frames))
        self._check_processors(names)
        ehs = self._args.get(args, kwargs, "encoder_hidden_states")
        if not isinstance(ehs, Tensor) or ehs.dim() != 3:
            raise ValueError(
                "semfid needs encoder_hidden_states [B, M, C] in the UNet call while a capture / "
                f"subject_loss / values block is active, got {type(ehs).__name__}"
            )
        kwarg = self._family.kwargs_arg
        cak = self._args.get(args, kwargs, kwarg)
        if cak is not None and not isinstance(cak, dict):
            raise TypeError(f"{kwarg} must be a dict or None, got {type(cak).__name__}")
        get = functools.partial(self._args.get, args, kwargs)
        grids: Dict[str, Optional[Tuple[int, int]]] = self._family.grids(get, names)
        call = plan_call(self._owner, frames, ehs, grids)

        merged = dict(cak) if cak else {}
        merged.update(self._family.call_kwargs(get))
        merged[CALL_KWARG] = call
        loss = next((f for f in frames if isinstance(f, LossRequest)), None)
        if loss is not None and self._family.joint:  # joint blocks: keys of the reference prompt
            merged[REF_KEYS_KWARG] = self._reference_keys(module, args, kwargs, loss)
        return self._args.replace(args, kwargs, kwarg, merged)

    def _reference_keys(self, module, args, kwargs, request: LossRequest) -> Dict[str, Tensor]:
        """The reference pass of a joint model's call (:mod:`.families.reference`)."""
        named = self._args.named(args, kwargs)
        self._local.in_reference = True
        try:
            return reference_keys(module, self._family, named, request, self._owner)
        finally:
            self._local.in_reference = False

    def _choose(self, layers: LayerFilter) -> List[str]:
        return resolve_layers(layers, self.layers, arg="layers")

    def _device(self) -> torch.device:
        """Where the model's weights are: block entry puts the token indices there once."""
        unet = self._unet_ref()
        param = next(unet.parameters(), None) if unet is not None else None
        return param.device if param is not None else torch.device("cpu")

    # ---- public context managers (block entry validates; see blocks.py) -------------------------
    def capture(self, tokens: TokensLike, head_reduce: str = "mean", layers: LayerFilter = None,
                accumulate: str = "last", *, ip_tokens=None):
        r"""Record the cross-attention maps of ``tokens`` during the UNet calls inside the block.

        Args:
            tokens: text-token positions whose probability columns are kept: ``[S]`` (every row),
                ``[B, S]``, ragged per-row lists (maps padded with zero columns), a
                :class:`semfid.TokenSelection`, or an :class:`~semfid.diffusers.AlignedTokens`
                (its target ``tokens``). Each index must be < M, the length of the call's
                ``encoder_hidden_states`` (checked once per call). ``None`` with ``ip_tokens``.
            head_reduce (`str`, *optional*, defaults to ``"mean"``): ``"mean"`` → maps [B, N, S];
                ``"none"`` → [B, H, N, S].
            layers (*optional*): subset of the installed layers (names or a predicate).
            accumulate (`str`, *optional*, defaults to ``"last"``): over the calls of the block,
                keep the last call's maps, a running ``"mean"``, or every call (``"list"``,
                ``rec.steps``) — e.g. a whole pipeline run's denoising steps.
            ip_tokens (*optional*): also record, in the chosen IP-Adapter layers, the maps of these
                image-prompt tokens (``rec.ip_maps[layer][adapter]`` [B, N, S_ip] / [B, H, N, S_ip]):
                ``"all"``, positions on each adapter's key axis (``n_img · num_tokens`` keys) in any
                form ``tokens`` takes, or ``{adapter index: "all" | positions}``
                (:mod:`semfid.diffusers.ip_maps`). With ``tokens=None`` only these are recorded.

        Returns:
            A context manager whose ``as`` target is an :class:`AttentionRecorder`.

        Raises:
            ValueError: bad ``tokens`` / ``head_reduce`` / ``accumulate`` / ``ip_tokens``, ``layers``
                matches nothing, ``ip_tokens`` with no IP-Adapter layer among the chosen ones or
                naming a missing adapter, or (per call) an image-prompt position past the adapter's keys.
            TypeError: ``ip_tokens`` of a wrong type.
            RuntimeError: semfid's processors were replaced after install.
        """
        return capture_block(self, tokens, head_reduce, layers, accumulate, ip_tokens)

    def subject_loss(
        self,
        reference_states: StatesLike,
        tokens: TokensLike,
        ref_tokens: Optional[TokensLike] = None,
        value_states: Optional[StatesLike] = None,
        head_reduce: str = "mean",
        layers: LayerFilter = None,
        *,
        ref_attention_mask: Optional[Tensor] = None,
        keep_maps: bool = False,
    ):
        r"""Compute SeFi-IDE's subject-wise attention loss in every chosen layer of the calls inside.

        In each layer the query of the UNet call is used twice: ``A_t`` with keys
        ``to_k(encoder_hidden_states)`` (the key states passed to the UNet) and ``A_r`` with keys
        ``to_k(reference_states)``; the layer loss is :func:`semfid.subject_attention`'s
        ``mean((A_t[..., tokens] − A_r[..., ref_tokens])²)`` per batch item (over each row's own
        tokens when rows are ragged), reference detached.

        Args:
            reference_states (`torch.Tensor` [B or 1, M_ref, C], or `dict[str, torch.Tensor]`): text
                states of the reference prompt (e.g. "a photo of the face of person"), fed to
                ``to_k`` of the reference branch; a dict gives per-layer states and must cover every
                chosen layer. Batch 1 is shared by the whole batch.
            tokens: target-prompt positions, in any form :meth:`capture` takes; an
                :class:`~semfid.diffusers.AlignedTokens` gives ``tokens`` and ``ref_tokens`` at once.
            ref_tokens (*optional*, defaults to ``tokens``): reference-prompt positions, as many per row.
            value_states (`torch.Tensor` [B or 1, M, C] or `dict`, *optional*): states for ``to_v``
                instead of ``encoder_hidden_states`` (K/V-disentangled tokens); a dict gives
                per-layer states, layers missing from it use ``encoder_hidden_states``.
            head_reduce (`str`, *optional*, defaults to ``"mean"``): maps averaged over heads
                (``"mean"``) or compared per head (``"none"``).
            layers (*optional*): subset of the installed layers.
            ref_attention_mask (`torch.Tensor` [B or 1, M_ref], *optional*): keep-mask (1 keep, 0
                drop) for the reference keys. Without it the reference branch reuses the call's
                ``encoder_attention_mask`` when ``M_ref == M`` (both prompts padded alike, the
                SeFi-IDE case) and is unmasked otherwise.
            keep_maps (`bool`, *optional*, defaults to `False`): also keep each layer's target maps
                ``A_t`` (``rec.maps``, differentiable) from the same fused pass, for
                :mod:`semfid.losses`.

        Returns:
            A context manager whose ``as`` target is a :class:`SubjectLossRecorder`
            (``rec.loss`` [B], ``rec.layer_losses``, ``rec.maps``).
        """
        return subject_loss_block(self, reference_states, tokens, ref_tokens, value_states, head_reduce,
                                  layers, ref_attention_mask=ref_attention_mask, keep_maps=keep_maps)

    def values(self, value_states: StatesLike):
        r"""Feed ``value_states`` to ``to_v`` of the installed layers (keys keep coming from
        ``encoder_hidden_states``) during the calls inside the block.

        Args:
            value_states (`torch.Tensor` [B or 1, M, C], or `dict[str, torch.Tensor]`): per-layer
                dict entries override; layers missing from a dict use ``encoder_hidden_states``.
                Under classifier-free guidance pass the **full batch** ``[uncond, cond]`` (e.g.
                ``torch.cat([uncond_states, cond_value_states])``): the processor does not split
                the batch. ``M`` must equal the key states' length.

        Returns:
            A context manager (``as`` target: ``None``); nests with :meth:`capture`.
        """
        return values_block(self, value_states)

    def __deepcopy__(self, memo):
        # copy.deepcopy(unet) never gets here: the hook copies as a no-op and each processor as the
        # stock one it stands in for, so the copy is a stock UNet (adoption.py). A copy of the
        # controller itself would share or lose its UNet, hook and thread-local blocks.
        raise TypeError(
            "a SemfidController cannot be deep-copied; copy.deepcopy(unet) gives a stock UNet: call "
            "semfid.diffusers.install() on the copy for a controller of its own"
        )

    def __repr__(self) -> str:
        return (f"SemfidController(layers={len(self.layers)}/{len(self.cross_attention_layers)}, "
                f"installed={self.installed})")


def install(unet: torch.nn.Module, layers: LayerFilter = None) -> SemfidController:
    r"""Replace every attention processor of ``unet`` with semfid's processor of its model family.

    With no ``with`` block active the model computes what it computed before (the stock processor's
    math and kernels). ``uninstall()`` puts back the very same processor objects.

    Args:
        unet: a ``UNet2DConditionModel`` (SD1.5, SDXL, or any UNet built from diffusers' legacy
            ``Attention`` blocks, with ``AttnProcessor2_0`` / ``AttnProcessor`` processors), an
            ``SD3Transformer2DModel`` (SD3 / SD3.5), a ``FluxTransformer2DModel`` or a
            ``PixArtTransformer2DModel`` (:mod:`semfid.diffusers.families`). Anything else raises an
            error naming these.
        layers (*optional*): which layers whose keys include the text (UNet / PixArt ``attn2``, SD3
            joint ``attn``, Flux double- and single-stream ``attn``) may capture / compute the loss:
            ``None`` (all), a name, a list of names (``"down_blocks.1.attentions.0.
            transformer_blocks.0.attn2"``, ``"single_transformer_blocks.3.attn"``) or a predicate on
            the name.

    Returns:
        :class:`SemfidController`

    Raises:
        ValueError: ``layers`` matches nothing or names unknown layers; the UNet carries processors
            semfid cannot stand in for (xformers, fused QKV, IP-Adapter, custom); already installed.
    """
    return SemfidController(unet, layers)


__all__ = ["install", "SemfidController", "AttentionRecorder", "SubjectLossRecorder"]
