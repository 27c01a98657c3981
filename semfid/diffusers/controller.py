"""Install semfid processors on a diffusers UNet and drive them: map capture, subject loss, K/V split.

Usage::

    from semfid.diffusers import install

    ctl = install(unet)                                    # every attn2 layer; layers=... filters
    with ctl.capture(tokens=[5, 6]) as rec:                # maps during generation
        unet(latents, t, encoder_hidden_states=ehs)
    heat = rec.aggregate(res=16)                           # [B, S, 16, 16]

    with ctl.subject_loss(ref_states, tokens=[5]) as rec:  # training
        pred = unet(noisy, t, encoder_hidden_states=key_states).sample
    (mse(pred, noise) + 0.003 * rec.loss.mean()).backward()   # after the block: fine

    with ctl.values(value_states):                         # K/V-disentangled text states
        unet(latents, t, encoder_hidden_states=key_states)
    ctl.uninstall()                                        # the previous processors, as they were

How state reaches the processors. A forward pre-hook on the UNet runs at every call. When the
calling thread has an active ``with`` block of this controller, the hook validates the requests
against the call's ``encoder_hidden_states`` and puts one immutable per-call state object into
``cross_attention_kwargs["semfid_call"]``. diffusers hands that dict to every transformer block and
processor, and gradient checkpointing keeps it in its recompute closure, so the recompute during
backward (after the ``with`` block has exited) runs exactly what the forward ran and does not record
a second time. Nothing is read from the controller during a recompute. Active blocks live in
``threading.local`` storage: each thread sees only its own.

Limits:

* One UNet call per ``with`` block is the intended use; a second call in the same block replaces
  the maps / losses of the first (``rec.num_calls`` counts them).
* Wrapping the *whole* UNet call in ``torch.utils.checkpoint`` (instead of
  ``unet.enable_gradient_checkpointing()``) re-runs the hook during backward, outside the block:
  don't.
* ``torch.compile`` (checked with torch 2.13, ``backend="aot_eager"``): with no block active a
  compiled UNet with semfid processors is one graph with no breaks (the processors run SDPA). With
  a block active, Dynamo traces the pre-hook and the per-call state (no break there: the token
  range check uses Python ints stored at block entry) but guards on that state, so new requests
  recompile; and each cross-attention layer that records maps currently graph-breaks inside
  :mod:`semfid.ops`' backend selection (``semfid.backends.cuda.unavailable_reason`` →
  ``importlib.import_module``), which also splits the surrounding diffusers frames and makes the
  processor frame recompile per layer until ``torch._dynamo.config.recompile_limit`` is hit (then
  that frame runs eagerly). Results stay correct; the fused custom ops themselves trace cleanly.
"""

from __future__ import annotations

import inspect
import threading
import weakref
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from .layers import (
    LayerFilter,
    attention_layers,
    cross_attention_layers,
    grid_size,
    layer_levels,
    resolve_layers,
)
from .processors import CALL_KWARG, SemfidAttnProcessor

Tensor = torch.Tensor
TokensLike = Union[Tensor, Sequence[int], Sequence[Sequence[int]]]
StatesLike = Union[Tensor, Dict[str, Tensor]]

_HEAD_REDUCTIONS = ("mean", "none")

# Processor classes whose behaviour SemfidAttnProcessor reproduces exactly (name-matched so that a
# diffusers version without one of them still imports).
_REPLACEABLE = ("AttnProcessor2_0", "AttnProcessor", "SemfidAttnProcessor")


# ------------------------------------------------------------------------------------------------
# recorders (what the `with` blocks return)
# ------------------------------------------------------------------------------------------------
class AttentionRecorder:
    r"""Maps captured by :meth:`SemfidController.capture`.

    Attributes:
        maps (`dict[str, torch.Tensor]`): layer name → float32 map ``P[..., tokens]``, [B, N, S]
            (``head_reduce="mean"``) or [B, H, N, S] (``"none"``), N = h·w query positions, in the
            order the layers ran. Differentiable when grad mode was on during the call.
        grids (`dict[str, tuple[int, int]]`): layer name → (h, w) of its query grid.
        tokens (`torch.Tensor`): the selected token indices, [S] or [B, S] (CPU int64).
        head_reduce (`str`): ``"mean"`` or ``"none"``.
        num_calls (`int`): UNet calls seen inside the block (the maps are from the last one).
    """

    def __init__(self, tokens: Tensor, head_reduce: str):
        self.maps: Dict[str, Tensor] = {}
        self.grids: Dict[str, Tuple[int, int]] = {}
        self.tokens = tokens
        self.head_reduce = head_reduce
        self.num_calls = 0

    def _store(self, name: str, value: Tensor, grid: Optional[Tuple[int, int]]) -> None:
        self.maps.pop(name, None)  # keep run order when a later call replaces a layer
        self.maps[name] = value
        n = value.shape[-2]
        if grid is None or grid[0] * grid[1] != n:
            side = int(round(n ** 0.5))
            grid = (side, side) if side * side == n else (1, n)
        self.grids[name] = grid

    @property
    def resolutions(self) -> List[Tuple[int, int]]:
        """The distinct (h, w) grids among the captured layers, largest first."""
        return sorted(set(self.grids.values()), key=lambda g: (-g[0] * g[1], g))

    def aggregate(self, res: Union[int, Tuple[int, int]] = 16) -> Tensor:
        r"""Mean over the captured layers whose query grid is ``res``, as images.

        Args:
            res (`int` or `tuple[int, int]`, *optional*, defaults to 16): grid side (square) or
                (h, w). SD1.5 at 512 px has 64, 32, 16 and 8 (mid block); SDXL at 1024 px 64 / 32.

        Returns:
            `torch.Tensor` [B, S, h, w] float32; per-head maps are averaged over heads first (the
            head count differs between SDXL levels).

        Raises:
            ValueError: ``res`` is malformed or no captured layer has that grid (the message lists
                the grids there are).
        """
        if isinstance(res, bool) or not (
            isinstance(res, int)
            or (isinstance(res, (tuple, list)) and len(res) == 2 and all(isinstance(r, int) for r in res))
        ):
            raise ValueError(f"res must be an int or an (h, w) pair of ints, got {res!r}")
        target = (res, res) if isinstance(res, int) else (int(res[0]), int(res[1]))
        chosen = [n for n in self.maps if self.grids[n] == target]
        if not chosen:
            raise ValueError(
                f"res={res!r}: no captured layer has a {target[0]}x{target[1]} map; captured grids: "
                f"{self.resolutions or 'none (was the UNet called inside the capture block?)'}"
            )
        images = []
        for n in chosen:
            m = self.maps[n]
            if m.dim() == 4:  # [B, H, N, S]
                m = m.mean(dim=1)
            b, _, s = m.shape
            images.append(m.transpose(1, 2).reshape(b, s, target[0], target[1]))
        return torch.stack(images).mean(dim=0)

    def __repr__(self) -> str:
        return f"AttentionRecorder(layers={len(self.maps)}, grids={self.resolutions}, calls={self.num_calls})"


class SubjectLossRecorder:
    r"""Losses recorded by :meth:`SemfidController.subject_loss`.

    Attributes:
        layer_losses (`dict[str, torch.Tensor]`): layer name → [B] float32 loss of
            :func:`semfid.subject_attention` in that layer, in run order.
        num_calls (`int`): UNet calls seen inside the block (the losses are from the last one).
    """

    def __init__(self):
        self.layer_losses: Dict[str, Tensor] = {}
        self.num_calls = 0

    def _store(self, name: str, value: Tensor, grid: Optional[Tuple[int, int]]) -> None:
        self.layer_losses.pop(name, None)
        self.layer_losses[name] = value

    @property
    def loss(self) -> Optional[Tensor]:
        """[B] float32: mean over the chosen layers of the per-layer loss (``None`` before a call)."""
        if not self.layer_losses:
            return None
        return torch.stack(list(self.layer_losses.values())).mean(dim=0)

    def __repr__(self) -> str:
        return f"SubjectLossRecorder(layers={len(self.layer_losses)}, calls={self.num_calls})"


# ------------------------------------------------------------------------------------------------
# frames (one per active `with` block) and the per-call state
# ------------------------------------------------------------------------------------------------
class _Frame:
    """One active ``with`` block: validated requests, immutable once pushed (except the recorder)."""

    __slots__ = ("kind", "layers", "tokens", "tokens_max", "ref_tokens", "head_reduce",
                 "reference_states", "ref_bias", "value_states", "recorder", "__weakref__")

    def __init__(self, kind, layers, tokens=None, ref_tokens=None, head_reduce="mean",
                 reference_states=None, ref_bias=None, value_states=None, recorder=None):
        self.kind = kind
        self.layers = frozenset(layers)
        self.tokens = tokens
        # a Python int, so the per-call range check needs no tensor op (no host sync, and no
        # torch.compile graph break in the pre-hook)
        self.tokens_max = int(tokens.max()) if tokens is not None else None
        self.ref_tokens = ref_tokens
        self.head_reduce = head_reduce
        self.reference_states = reference_states
        self.ref_bias = ref_bias
        self.value_states = value_states
        self.recorder = recorder


class _CapturePlan(NamedTuple):
    frame: _Frame
    tokens: Tensor
    head_reduce: str


class _LossPlan(NamedTuple):
    frame: _Frame
    reference_states: Tensor
    tokens: Tensor
    ref_tokens: Tensor
    head_reduce: str
    ref_bias: Optional[Tensor]


class _LayerPlan(NamedTuple):
    value_states: Optional[Tensor]
    captures: Tuple[_CapturePlan, ...]
    loss: Optional[_LossPlan]

    @property
    def wants_maps(self) -> bool:
        return self.loss is not None or bool(self.captures)


def _per_layer(states: Optional[StatesLike], name: str) -> Optional[Tensor]:
    if isinstance(states, dict):
        return states.get(name)
    return states


class _CallState:
    """What the processors of one UNet call do; created by the pre-hook, never mutated after that
    except for the set of (frame, layer) pairs already recorded, which makes a checkpoint recompute
    skip recording."""

    def __init__(self, owner, frames: Tuple[_Frame, ...], grids: Dict[str, Optional[Tuple[int, int]]]):
        self.owner = owner
        self.frames = frames
        self.grids = grids
        self._recorded = set()

    def plan(self, name: str) -> Optional[_LayerPlan]:
        value_states = None
        for f in reversed(self.frames):  # innermost block giving values for this layer wins
            if f.value_states is not None and name in f.layers:
                value_states = _per_layer(f.value_states, name)
                if value_states is not None:
                    break
        captures = tuple(_CapturePlan(f, f.tokens, f.head_reduce) for f in self.frames
                         if f.kind == "capture" and name in f.layers)
        loss = None
        for f in self.frames:
            if f.kind == "loss" and name in f.layers:
                loss = _LossPlan(f, _per_layer(f.reference_states, name), f.tokens, f.ref_tokens,
                                 f.head_reduce, f.ref_bias)
        if value_states is None and not captures and loss is None:
            return None
        return _LayerPlan(value_states, captures, loss)

    def record(self, item, name: str, value: Tensor) -> None:
        key = (id(item.frame), name)
        if key in self._recorded:  # gradient-checkpoint recompute of this call: already stored
            return
        self._recorded.add(key)
        item.frame.recorder._store(name, value, self.grids.get(name))


# ------------------------------------------------------------------------------------------------
# validation helpers (ValueError / TypeError naming the argument; never assert)
# ------------------------------------------------------------------------------------------------
def _tokens_tensor(tokens: TokensLike, arg: str) -> Tensor:
    """[S] or [B, S] integer indices (list or tensor) → CPU int64 tensor; checks sign and shape."""
    if tokens is None:
        raise ValueError(f"{arg} must give token indices as a list of ints or an int64 tensor [S] / [B, S], got None")
    if isinstance(tokens, Tensor):
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise TypeError(f"{arg} must hold integer token indices, got dtype {tokens.dtype}")
        t = tokens.detach().to("cpu", torch.int64)  # one host sync here, none per layer
    elif isinstance(tokens, (list, tuple)):
        flat = [x for row in tokens for x in (row if isinstance(row, (list, tuple)) else [row])]
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in flat):
            raise TypeError(f"{arg} must hold integer token indices, got {tokens!r}")
        try:
            t = torch.tensor(tokens, dtype=torch.int64)
        except (ValueError, TypeError):
            raise ValueError(f"{arg} must be a flat list [S] or a rectangular list [B, S], got {tokens!r}") from None
    elif isinstance(tokens, int) and not isinstance(tokens, bool):
        t = torch.tensor([tokens], dtype=torch.int64)
    else:
        raise TypeError(f"{arg} must be a list of ints or an int64 tensor [S] / [B, S], got {type(tokens).__name__}")
    if t.dim() not in (1, 2) or t.shape[-1] == 0:
        raise ValueError(f"{arg} must have shape [S] or [B, S] with S >= 1, got {tuple(t.shape)}")
    if int(t.min()) < 0:
        raise ValueError(f"{arg} must be non-negative token positions, got min {int(t.min())}")
    return t


def _check_token_range(hi: int, length: int, arg: str, states_arg: str) -> None:
    if hi >= length:
        raise ValueError(
            f"{arg} must index the {length} text tokens of {states_arg} (0 ... {length - 1}), "
            f"got index {hi}"
        )


def _check_rows(t: Tensor, batch: int, arg: str) -> None:
    if t.dim() == 2 and t.shape[0] != batch:
        raise ValueError(
            f"{arg} has {t.shape[0]} rows but the UNet call has batch {batch}: give [S] (shared) or "
            f"[B={batch}, S] (under classifier-free guidance B counts both halves)"
        )


def _check_states(states: Tensor, arg: str, width: int, layer: str) -> None:
    if not isinstance(states, Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor [B, M, C] (or a dict of them), got {type(states).__name__}")
    if states.dim() != 3:
        raise ValueError(f"{arg} must be [B, M, C] text states, got shape {tuple(states.shape)}")
    if states.shape[-1] != width:
        raise ValueError(
            f"{arg} must have width C={width} (the input width of {layer}'s projection), "
            f"got shape {tuple(states.shape)}"
        )
    if states.shape[1] == 0:
        raise ValueError(f"{arg} must hold at least one token, got shape {tuple(states.shape)}")


def _check_states_for_call(states: Tensor, arg: str, ehs: Tensor, *, same_length: bool) -> None:
    b, m = ehs.shape[0], ehs.shape[1]
    if states.shape[0] not in (1, b):
        raise ValueError(
            f"{arg} must have batch 1 or the UNet call's batch {b} (under classifier-free guidance "
            f"the full batch, both halves), got shape {tuple(states.shape)}"
        )
    if same_length and states.shape[1] != m:
        raise ValueError(
            f"{arg} must have the {m} tokens of encoder_hidden_states (keys and values pair up), "
            f"got shape {tuple(states.shape)}"
        )
    if states.dtype != ehs.dtype:
        raise TypeError(f"{arg} must have the dtype of encoder_hidden_states ({ehs.dtype}), got {states.dtype}")
    if states.device != ehs.device:
        raise ValueError(f"{arg} must be on the device of encoder_hidden_states ({ehs.device}), got {states.device}")


# ------------------------------------------------------------------------------------------------
# the controller
# ------------------------------------------------------------------------------------------------
class _Owner:
    """Identity token shared by a controller and its processors (no reference back to the UNet)."""

    __slots__ = ("__weakref__",)


class _Block:
    """Context manager for one ``with`` block: pushes a frame on enter, pops it on exit."""

    def __init__(self, controller: "SemfidController", frame: _Frame, result):
        self._ctl = controller
        self._frame = frame
        self._result = result

    def __enter__(self):
        self._ctl._check_processors(self._frame.layers)
        self._ctl._push(self._frame)
        return self._result

    def __exit__(self, exc_type, exc, tb):
        self._ctl._pop(self._frame)
        rec = self._frame.recorder
        if exc_type is None and rec is not None and rec.num_calls > 0:
            got = rec.maps if isinstance(rec, AttentionRecorder) else rec.layer_losses
            missing = sorted(self._frame.layers.difference(got))
            if missing:
                raise RuntimeError(
                    f"{len(missing)} chosen layer(s) ran without recording (e.g. {missing[0]}): their "
                    "semfid processors were replaced or bypassed during the block "
                    "(set_attn_processor, enable_xformers_memory_efficient_attention, "
                    "fuse_qkv_projections, load_ip_adapter, ...)"
                )
        return False


class SemfidController:
    r"""Handle returned by :func:`install`; see the module docstring for the whole picture.

    Attributes:
        layers (`list[str]`): the cross-attention layers chosen at install, in module order.
        cross_attention_layers (`list[str]`): every cross-attention layer of the UNet.
    """

    def __init__(self, unet: torch.nn.Module, layers: LayerFilter = None):
        if not isinstance(unet, torch.nn.Module):
            raise TypeError(f"unet must be a diffusers UNet (torch.nn.Module), got {type(unet).__name__}")
        modules = attention_layers(unet)
        cross = cross_attention_layers(unet)
        if not cross:
            raise ValueError(
                f"unet ({type(unet).__name__}) has no diffusers cross-attention (attn2) layers to install on"
            )
        try:
            params = list(inspect.signature(unet.forward).parameters)
        except (TypeError, ValueError):
            params = []
        for needed in ("sample", "encoder_hidden_states", "cross_attention_kwargs"):
            if needed not in params:
                raise ValueError(
                    f"unet.forward must take `{needed}` (diffusers UNet2DConditionModel does); "
                    f"{type(unet).__name__}.forward takes {params}"
                )
        self._arg_index = {p: params.index(p) for p in ("sample", "encoder_hidden_states",
                                                        "cross_attention_kwargs")}
        foreign = [(n, type(m.processor).__name__) for n, m in modules.items()
                   if type(m.processor).__name__ not in _REPLACEABLE]
        if foreign:
            name, cls = foreign[0]
            raise ValueError(
                f"unet has {len(foreign)} attention processor(s) that semfid cannot stand in for "
                f"(e.g. {name}: {cls}); install() reproduces only {list(_REPLACEABLE[:2])}. Call "
                "unet.set_default_attn_processor() (or undo xformers / fused QKV / IP-Adapter) first."
            )
        stale = getattr(unet, "_semfid_controller", None)
        stale = stale() if stale is not None else None
        if stale is not None and stale.installed:
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
        self._processors = {n: SemfidAttnProcessor(n, self._owner, active=n in chosen) for n in modules}
        self._k_width = {n: cross[n].to_k.in_features for n in self.layers}
        self._v_width = {n: cross[n].to_v.in_features for n in self.layers}
        self._levels = layer_levels(unet, self.layers)
        self._local = threading.local()
        self._lock = threading.Lock()
        for n, m in modules.items():
            m.set_processor(self._processors[n])
        self._hook = unet.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        unet._semfid_controller = weakref.ref(self)
        self.installed = True

    # ---- install state ------------------------------------------------------------------------
    def _processors_intact(self, names=None) -> bool:
        names = self._processors if names is None else names
        return all(self._modules[n].processor is self._processors[n] for n in names)

    def _check_processors(self, names) -> None:
        if not self.installed:
            raise RuntimeError("this semfid controller was uninstalled; call semfid.diffusers.install(unet) again")
        replaced = [n for n in names if self._modules[n].processor is not self._processors[n]]
        if replaced:
            n = replaced[0]
            raise RuntimeError(
                f"semfid processors were replaced on {len(replaced)} layer(s) after install (e.g. {n} "
                f"now has {type(self._modules[n].processor).__name__}); something like "
                "set_attn_processor, enable_xformers_memory_efficient_attention, "
                "fuse_qkv_projections or load_ip_adapter ran. No maps or losses would be recorded: "
                "undo it and call semfid.diffusers.install(unet) again."
            )

    def _detach(self) -> None:
        self._hook.remove()
        self.installed = False

    def uninstall(self) -> None:
        r"""Put back exactly the processor objects that were there before :func:`install`.

        Layers whose semfid processor was since replaced by someone else keep that replacement.
        Calling it twice is a no-op.
        """
        with self._lock:
            if not self.installed:
                return
            for n, m in self._modules.items():
                if m.processor is self._processors[n]:
                    m.set_processor(self._saved[n])
            self._detach()
            unet = self._unet_ref()
            if unet is not None and getattr(unet, "_semfid_controller", lambda: None)() is self:
                del unet._semfid_controller

    # ---- per-thread frames --------------------------------------------------------------------
    def _frames(self) -> Tuple[_Frame, ...]:
        return getattr(self._local, "frames", ())

    def _push(self, frame: _Frame) -> None:
        frames = self._frames()
        if frame.kind == "loss" and any(f.kind == "loss" for f in frames):
            raise RuntimeError("subject_loss blocks of one controller cannot be nested")
        self._local.frames = frames + (frame,)

    def _pop(self, frame: _Frame) -> None:
        self._local.frames = tuple(f for f in self._frames() if f is not frame)

    # ---- the UNet pre-hook --------------------------------------------------------------------
    def _get_arg(self, args, kwargs, name):
        if name in kwargs:
            return kwargs[name]
        i = self._arg_index[name]
        return args[i] if i < len(args) else None

    def _pre_hook(self, module, args, kwargs):
        frames = self._frames()
        if not frames:
            return None
        names = set().union(*(f.layers for f in frames))
        self._check_processors(names)
        sample = self._get_arg(args, kwargs, "sample")
        ehs = self._get_arg(args, kwargs, "encoder_hidden_states")
        if not isinstance(ehs, Tensor) or ehs.dim() != 3:
            raise ValueError(
                "semfid needs encoder_hidden_states [B, M, C] in the UNet call while a capture / "
                f"subject_loss / values block is active, got {type(ehs).__name__}"
            )
        for f in frames:
            self._validate_for_call(f, ehs)
        grids: Dict[str, Optional[Tuple[int, int]]] = {}
        if isinstance(sample, Tensor) and sample.dim() == 4:
            h, w = sample.shape[-2:]
            grids = {n: grid_size(h, w, self._levels.get(n)) for n in names}
        for f in frames:
            if f.recorder is not None:
                f.recorder.num_calls += 1
        call = _CallState(self._owner, frames, grids)

        cak = self._get_arg(args, kwargs, "cross_attention_kwargs")
        if cak is not None and not isinstance(cak, dict):
            raise TypeError(f"cross_attention_kwargs must be a dict or None, got {type(cak).__name__}")
        merged = dict(cak) if cak else {}
        merged[CALL_KWARG] = call
        i = self._arg_index["cross_attention_kwargs"]
        if "cross_attention_kwargs" not in kwargs and i < len(args):
            args = args[:i] + (merged,) + args[i + 1:]
        else:
            kwargs = dict(kwargs)
            kwargs["cross_attention_kwargs"] = merged
        return args, kwargs

    def _validate_for_call(self, f: _Frame, ehs: Tensor) -> None:
        b, m = ehs.shape[0], ehs.shape[1]
        if f.tokens is not None:
            _check_rows(f.tokens, b, "tokens")
            _check_token_range(f.tokens_max, m, "tokens", "encoder_hidden_states")
        if f.ref_tokens is not None:
            _check_rows(f.ref_tokens, b, "ref_tokens")
        if f.reference_states is not None:
            for states in (f.reference_states.values() if isinstance(f.reference_states, dict)
                           else (f.reference_states,)):
                _check_states_for_call(states, "reference_states", ehs, same_length=False)
        if f.ref_bias is not None and f.ref_bias.shape[0] not in (1, b):
            raise ValueError(
                f"ref_attention_mask must have batch 1 or {b}, got shape {tuple(f.ref_bias.shape[:1]) + tuple(f.ref_bias.shape[2:])}"
            )
        if f.value_states is not None:
            for states in (f.value_states.values() if isinstance(f.value_states, dict)
                           else (f.value_states,)):
                _check_states_for_call(states, "value_states", ehs, same_length=True)

    # ---- request validation at block entry ----------------------------------------------------
    def _choose(self, layers: LayerFilter) -> List[str]:
        return resolve_layers(layers, self.layers, arg="layers")

    def _states(self, states: Optional[StatesLike], arg: str, layers: List[str], widths,
                *, required_for_all: bool) -> Optional[StatesLike]:
        if states is None:
            return None
        if isinstance(states, dict):
            unknown = [k for k in states if k not in layers]
            if unknown:
                raise ValueError(
                    f"{arg} has entries for layers that are not chosen here: {unknown[:3]} "
                    f"(chosen: {len(layers)} layers, e.g. {layers[0]})"
                )
            if required_for_all:
                missing = [n for n in layers if n not in states]
                if missing:
                    raise ValueError(f"{arg} must have an entry for every chosen layer; missing {missing[:3]}")
            for n, t in states.items():
                _check_states(t, f"{arg}[{n!r}]", widths[n], n)
            return dict(states)
        for n in layers:
            _check_states(states, arg, widths[n], n)
        return states

    @staticmethod
    def _head_reduce(head_reduce: str) -> str:
        if not isinstance(head_reduce, str) or head_reduce not in _HEAD_REDUCTIONS:
            raise ValueError(f"head_reduce must be one of {_HEAD_REDUCTIONS}, got {head_reduce!r}")
        return head_reduce

    # ---- public context managers ----------------------------------------------------------------
    def capture(self, tokens: TokensLike, head_reduce: str = "mean", layers: LayerFilter = None):
        r"""Record the cross-attention maps of ``tokens`` during the UNet calls inside the block.

        Args:
            tokens (`list[int]` or `torch.Tensor` [S] / [B, S]): text-token positions whose
                probability columns are kept; each must be < M, the length of the call's
                ``encoder_hidden_states`` (checked at the call).
            head_reduce (`str`, *optional*, defaults to ``"mean"``): ``"mean"`` → maps [B, N, S];
                ``"none"`` → [B, H, N, S].
            layers (*optional*): subset of the installed layers (names or a predicate).

        Returns:
            A context manager whose ``as`` target is an :class:`AttentionRecorder`.

        Raises:
            ValueError: bad ``tokens`` / ``head_reduce``, or ``layers`` matches nothing.
            RuntimeError: semfid's processors were replaced after install.
        """
        chosen = self._choose(layers)
        t = _tokens_tensor(tokens, "tokens")
        hr = self._head_reduce(head_reduce)
        rec = AttentionRecorder(t, hr)
        return _Block(self, _Frame("capture", chosen, tokens=t, head_reduce=hr, recorder=rec), rec)

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
    ):
        r"""Compute SeFi-IDE's subject-wise attention loss in every chosen layer of the calls inside.

        In each layer the query of the UNet call is used twice: ``A_t`` with keys
        ``to_k(encoder_hidden_states)`` (the key states passed to the UNet) and ``A_r`` with keys
        ``to_k(reference_states)``; the layer loss is :func:`semfid.subject_attention`'s
        ``mean((A_t[..., tokens] − A_r[..., ref_tokens])²)`` per batch item, reference detached.

        Args:
            reference_states (`torch.Tensor` [B or 1, M_ref, C], or `dict[str, torch.Tensor]`): text
                states of the reference prompt (e.g. "a photo of the face of person"), fed to
                ``to_k`` of the reference branch; a dict gives per-layer states and must cover every
                chosen layer. Batch 1 is shared by the whole batch.
            tokens (`list[int]` or `torch.Tensor` [S] / [B, S]): target-prompt positions.
            ref_tokens (*optional*, defaults to ``tokens``): reference-prompt positions, as many.
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

        Returns:
            A context manager whose ``as`` target is a :class:`SubjectLossRecorder`
            (``rec.loss`` [B], ``rec.layer_losses``).
        """
        chosen = self._choose(layers)
        t = _tokens_tensor(tokens, "tokens")
        rt = t if ref_tokens is None else _tokens_tensor(ref_tokens, "ref_tokens")
        if rt.shape[-1] != t.shape[-1]:
            raise ValueError(
                f"ref_tokens must select as many tokens as tokens ({t.shape[-1]}), got {rt.shape[-1]}"
            )
        hr = self._head_reduce(head_reduce)
        if reference_states is None:
            raise ValueError("reference_states must be the reference prompt's text states [B, M_ref, C], got None")
        refs = self._states(reference_states, "reference_states", chosen, self._k_width, required_for_all=True)
        for states in (refs.values() if isinstance(refs, dict) else (refs,)):
            _check_token_range(int(rt.max()), states.shape[1], "ref_tokens" if ref_tokens is not None else "tokens",
                               "reference_states")
        vals = self._states(value_states, "value_states", chosen, self._v_width, required_for_all=False)
        ref_bias = None
        if ref_attention_mask is not None:
            m = ref_attention_mask
            if not isinstance(m, Tensor) or m.dim() not in (1, 2):
                raise ValueError(f"ref_attention_mask must be a keep-mask tensor [B, M_ref], got {getattr(m, 'shape', type(m).__name__)}")
            m = m if m.dim() == 2 else m[None]
            for states in (refs.values() if isinstance(refs, dict) else (refs,)):
                if m.shape[-1] != states.shape[1]:
                    raise ValueError(
                        f"ref_attention_mask must have the M_ref={states.shape[1]} tokens of "
                        f"reference_states, got shape {tuple(ref_attention_mask.shape)}"
                    )
            ref_bias = ((1 - m.to(torch.float32)) * -10000.0)[:, None, :]  # diffusers' convention
        rec = SubjectLossRecorder()
        frame = _Frame("loss", chosen, tokens=t, ref_tokens=rt, head_reduce=hr,
                       reference_states=refs, ref_bias=ref_bias, value_states=vals, recorder=rec)
        return _Block(self, frame, rec)

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
        if value_states is None:
            raise ValueError("value_states must be a tensor [B, M, C] or a {layer name: tensor} dict, got None")
        vals = self._states(value_states, "value_states", self.layers, self._v_width, required_for_all=False)
        return _Block(self, _Frame("values", self.layers, value_states=vals), None)

    def __deepcopy__(self, memo):
        # Reached through the UNet's forward pre-hook when an installed UNet is deep-copied (EMA
        # copies, ...). A copy sharing this controller would record into its blocks; a copy of the
        # controller would need new hooks and thread-local state. Neither is what a caller
        # expects silently, so say what to do instead.
        raise TypeError(
            "cannot deepcopy a UNet while semfid processors are installed on it: copy it before "
            "semfid.diffusers.install(), or call ctl.uninstall() first and install on each copy"
        )

    def __repr__(self) -> str:
        return (f"SemfidController(layers={len(self.layers)}/{len(self.cross_attention_layers)}, "
                f"installed={self.installed})")


def install(unet: torch.nn.Module, layers: LayerFilter = None) -> SemfidController:
    r"""Replace every attention processor of ``unet`` with :class:`SemfidAttnProcessor`.

    With no ``with`` block active the UNet computes what it computed before (``AttnProcessor2_0``
    math, SDPA kernels). ``uninstall()`` puts back the very same processor objects.

    Args:
        unet (`UNet2DConditionModel`): SD1.5, SDXL or any UNet built from diffusers' legacy
            ``Attention`` blocks, with ``AttnProcessor2_0`` / ``AttnProcessor`` processors.
        layers (*optional*): which cross-attention (attn2) layers may capture / compute the loss:
            ``None`` (all), a name, a list of names (``"down_blocks.1.attentions.0.
            transformer_blocks.0.attn2"``) or a predicate on the name.

    Returns:
        :class:`SemfidController`

    Raises:
        ValueError: ``layers`` matches nothing or names unknown layers; the UNet carries processors
            semfid cannot stand in for (xformers, fused QKV, IP-Adapter, custom); already installed.
    """
    return SemfidController(unet, layers)


__all__ = ["install", "SemfidController", "AttentionRecorder", "SubjectLossRecorder"]
