"""What the ``with`` blocks return: recorded maps and losses, with loud errors and accumulation.

A recorder is filled by the processors during the UNet calls inside its block and read after it.
Reading before any UNet call ran raises :class:`NoCallError` (a ``RuntimeError``) naming the cause,
instead of handing back ``None`` or an empty dict.

Accumulation over the calls of a block (``capture(..., accumulate=...)``):

* ``"last"`` (default): each call replaces the previous one's values;
* ``"mean"``: a running mean over the calls (e.g. over a pipeline's denoising steps);
* ``"list"``: every call kept, ``rec.steps[i]`` is call i's ``{layer: map}`` dict.

Maps of the image-prompt tokens of IP-Adapter layers (``capture(..., ip_tokens=...)``,
:mod:`semfid.diffusers.ip_maps`) are kept beside the text maps under the same accumulation:
``rec.ip_maps[layer][adapter]``, and ``aggregate`` / ``save_heatmaps`` take ``adapter=`` to show them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .ip_maps import IPTokens
from .requests import ACCUMULATE, CallSink, check_token_range

Tensor = torch.Tensor
Grid = Tuple[int, int]


class NoCallError(RuntimeError):
    """A recorder was read although no UNet call ran inside its ``with`` block."""


class _Series:
    """Per-layer values over the calls of one block, under one accumulation mode."""

    def __init__(self, mode: str):
        if not isinstance(mode, str) or mode not in ACCUMULATE:
            raise ValueError(f"accumulate must be one of {ACCUMULATE}, got {mode!r}")
        self.mode = mode
        self.steps: List[Dict[str, Tensor]] = []
        self._last: Dict[str, Tensor] = {}
        self._last_call = -1
        self._sum: Dict[str, Tensor] = {}
        self._count: Dict[str, int] = {}

    def put(self, call: int, name: str, value: Tensor) -> None:
        if self.mode == "mean":
            self._sum[name] = value if name not in self._sum else self._sum[name] + value
            self._count[name] = self._count.get(name, 0) + 1
            return
        if call != self._last_call:  # a new call starts: "last" forgets the previous one
            self._last, self._last_call = {}, call
        self._last[name] = value
        if self.mode == "list":
            while len(self.steps) <= call:
                self.steps.append({})
            self.steps[call][name] = value

    def current(self) -> Dict[str, Tensor]:
        if self.mode == "mean":
            return {n: s / self._count[n] for n, s in self._sum.items()}
        return self._last

    def names(self) -> List[str]:
        """Layers recorded so far in the newest call (for the block's missing-layer check)."""
        return list(self._sum if self.mode == "mean" else self._last)


class _Recorder:
    """Shared by both recorders: call counting, map storage (grids) and the no-call error.

    The UNet calls leave their results in ``_sink`` (:class:`~semfid.diffusers.requests.CallSink`);
    they are folded in, in call order, whenever the recorder is read (and, in eager mode, when
    the next call starts), which is also where a compiled call's token range is checked.
    """

    _BLOCK = "capture"

    def __init__(self, accumulate: str = "last"):
        self._maps = _Series(accumulate)
        self._ip = _Series(accumulate)  # (layer, adapter) -> image-prompt maps
        self._ip_tokens: Optional[IPTokens] = None
        self.grids: Dict[str, Grid] = {}
        self._calls = 0
        self._sink = CallSink()
        self._head = self._sink.current
        # per entry of a call's "num_keys": (largest token index, its argument, the states it indexes)
        self._limits: Tuple[Tuple[int, str, str], ...] = ()

    @property
    def accumulate(self) -> str:
        return self._maps.mode

    @property
    def num_calls(self) -> int:
        """UNet calls seen inside the block so far."""
        self._fold()
        return self._calls

    def _fold(self) -> None:
        calls, head = CallSink.take(self._head)
        for entry in calls:  # all checked before any is taken: a bad call keeps raising
            for (hi, arg, states_arg), num_keys in zip(self._limits, entry["num_keys"]):
                check_token_range(hi, num_keys, arg, states_arg)
            for (_, adapter), (_, num_keys, per_image) in entry["ip"].items():
                self._ip_tokens.check_call(adapter, num_keys, per_image)
        self._head = head
        for entry in calls:
            call, self._calls = self._calls, self._calls + 1
            for name, (value, maps) in entry["results"].items():
                self._store(call, name, value, entry["grids"].get(name), maps)
            for (name, adapter), (maps, _, _) in entry["ip"].items():
                self._put_map(call, name, maps, entry["grids"].get(name), series=self._ip, key=(name, adapter))

    def _recorded_layers(self) -> List[str]:
        """Layers recorded in the newest call (text maps / losses, else image-prompt maps)."""
        names = self._maps.names()
        return names if names else sorted({name for name, _ in self._ip.names()})

    def _store(self, call: int, name: str, value: Tensor, grid: Optional[Grid], maps=None) -> None:
        raise NotImplementedError

    def _require_call(self, what: str) -> None:
        if self.num_calls == 0:
            raise NoCallError(
                f"{type(self).__name__}.{what}: no UNet call ran inside the `with ctl.{self._BLOCK}(...)` "
                "block, so nothing was recorded. Call the UNet (or the pipeline) inside the block; "
                "the values can be read after it has exited."
            )

    def _put_map(self, call: int, name: str, value: Tensor, grid: Optional[Grid], series=None, key=None) -> None:
        (series or self._maps).put(call, name if key is None else key, value)
        n = value.shape[-2]
        if grid is None or grid[0] * grid[1] != n:
            side = int(round(n ** 0.5))
            grid = (side, side) if side * side == n else (1, n)
        self.grids[name] = grid

    @property
    def maps(self) -> Dict[str, Tensor]:
        r"""layer name → float32 map ``P[..., tokens]`` [B, N, S] (``head_reduce="mean"``) or
        [B, H, N, S], in run order: the last call's, or the mean over calls (``accumulate="mean"``)."""
        self._require_call("maps")
        maps = self._maps.current()
        if not maps:
            raise NoCallError(f"{type(self).__name__}.maps: the block recorded no maps of text tokens "
                              "(subject_loss records them only with keep_maps=True; capture(tokens=None, "
                              "ip_tokens=...) only those of image-prompt tokens: rec.ip_maps)")
        return maps

    @property
    def ip_maps(self) -> Dict[str, Dict[int, Tensor]]:
        r"""layer name → {adapter index → float32 map of the image-prompt tokens} of each IP-Adapter
        layer: [B, N, S_ip] (``head_reduce="mean"``) or [B, H, N, S_ip], the columns ``ip_tokens``
        chose on the adapter's key axis, accumulated as :attr:`maps` (:mod:`semfid.diffusers.ip_maps`)."""
        self._require_call("ip_maps")
        return self._ip_view(self._ip.current())

    @property
    def ip_steps(self) -> List[Dict[str, Dict[int, Tensor]]]:
        """Every call's :attr:`ip_maps`, in call order (``accumulate="list"`` only)."""
        self._require_list("ip_steps")
        return [self._ip_view(step) for step in self._ip.steps]

    def _ip_view(self, flat: Dict[tuple, Tensor]) -> Dict[str, Dict[int, Tensor]]:
        if self._ip_tokens is None:
            raise ValueError("ip_maps needs capture(..., ip_tokens='all' | positions | {adapter: ...})")
        nested: Dict[str, Dict[int, Tensor]] = {}
        for (name, adapter), m in flat.items():
            nested.setdefault(name, {})[adapter] = m
        return nested

    def _layer_maps(self, step: Optional[int], adapter: Optional[int]) -> Dict[str, Tensor]:
        """{layer: map} of the text tokens, or of adapter ``adapter``'s image-prompt tokens."""
        if adapter is None:
            return self.maps if step is None else self.steps[step]
        if isinstance(adapter, bool) or not isinstance(adapter, int):
            raise TypeError(f"adapter must be an IP-Adapter index (int) or None, got {adapter!r}")
        nested = self.ip_maps if step is None else self.ip_steps[step]
        maps = {n: per[adapter] for n, per in nested.items() if adapter in per}
        if not maps:
            held = sorted({a for per in nested.values() for a in per})
            raise ValueError(f"adapter={adapter}: no image-prompt maps of that IP-Adapter were captured "
                             f"(captured adapters: {held})")
        return maps

    def _require_list(self, what: str) -> None:
        self._require_call(what)
        if self.accumulate != "list":
            raise ValueError(f"{what} needs capture(..., accumulate='list'); this recorder has "
                             f"accumulate={self.accumulate!r}")

    @property
    def steps(self) -> List[Dict[str, Tensor]]:
        """Every call's ``{layer: map}`` dict, in call order (``accumulate="list"`` only)."""
        self._require_list("steps")
        return list(self._maps.steps)

    @property
    def resolutions(self) -> List[Grid]:
        """The distinct (h, w) grids among the captured layers, largest first."""
        return sorted(set(self.grids.values()), key=lambda g: (-g[0] * g[1], g))

    def aggregate(self, res: Union[int, Grid] = 16, step: Optional[int] = None,
                  adapter: Optional[int] = None) -> Tensor:
        r"""Mean over the captured layers whose query grid is ``res``, as images.

        Args:
            res (`int` or `tuple[int, int]`, *optional*, defaults to 16): grid side (square) or
                (h, w). SD1.5 at 512 px has 64, 32, 16 and 8 (mid block); SDXL at 1024 px 64 / 32.
            step (`int`, *optional*): with ``accumulate="list"``, that call's maps (default: the
                accumulated / last ones).
            adapter (`int`, *optional*): the maps of that IP-Adapter's image-prompt tokens
                (:attr:`ip_maps`) instead of the text tokens'.

        Returns:
            `torch.Tensor` [B, S, h, w] (S_ip with ``adapter``) float32; per-head maps are averaged
            over heads first.

        Raises:
            ValueError: ``res`` is malformed or no captured layer has that grid.
            NoCallError: no UNet call ran inside the block.
        """
        if isinstance(res, bool) or not (
            isinstance(res, int)
            or (isinstance(res, (tuple, list)) and len(res) == 2 and all(isinstance(r, int) for r in res))
        ):
            raise ValueError(f"res must be an int or an (h, w) pair of ints, got {res!r}")
        target = (res, res) if isinstance(res, int) else (int(res[0]), int(res[1]))
        maps = self._layer_maps(step, adapter)
        chosen = [n for n in maps if self.grids[n] == target]
        if not chosen:
            raise ValueError(
                f"res={res!r}: no captured layer has a {target[0]}x{target[1]} map; captured grids: "
                f"{self.resolutions}"
            )
        images = []
        for n in chosen:
            m = maps[n]
            if m.dim() == 4:  # [B, H, N, S]
                m = m.mean(dim=1)
            b, _, s = m.shape
            images.append(m.transpose(1, 2).reshape(b, s, target[0], target[1]))
        return torch.stack(images).mean(dim=0)

    def save_heatmaps(self, path: Union[str, Path], image=None, *, labels: Optional[Sequence[str]] = None,
                      res: Union[int, Grid] = 16, row: int = 0, step: Optional[int] = None,
                      columns: Optional[int] = None, adapter: Optional[int] = None):
        r"""Save row ``row``'s per-token maps as one labelled grid image (DAAM / Prompt-to-Prompt style).

        Args:
            path: the PNG to write (e.g. beside the generated image: ``out.png`` → ``out-maps.png``).
            image (`PIL.Image.Image`, *optional*): the generated image, shown first and under each map.
            labels (*optional*): one label per captured token (e.g. ``AlignedTokens.labels[row]``);
                defaults to the token positions.
            res, step, adapter: as in :meth:`aggregate` (``adapter``: image-prompt tokens).

        Returns:
            `PIL.Image.Image`: the grid that was written.
        """
        from .heatmaps import heatmap_grid

        heat = self.aggregate(res, step=step, adapter=adapter)
        if not 0 <= row < heat.shape[0]:
            raise IndexError(f"row must lie in [0, {heat.shape[0]}) (the captured batch), got {row}")
        grid = heatmap_grid(heat[row].detach(), labels, image=image, columns=columns)
        grid.save(str(path))
        return grid

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(layers={len(self.grids)}, grids={self.resolutions}, "
                f"calls={self.num_calls}, accumulate={self.accumulate!r})")


class AttentionRecorder(_Recorder):
    r"""Maps captured by :meth:`SemfidController.capture`.

    Attributes:
        maps (`dict[str, torch.Tensor]`): see :attr:`_Recorder.maps`; differentiable when grad
            mode was on during the call (``accumulate="last"`` / ``"list"`` / ``"mean"``).
        steps: every call's maps (``accumulate="list"``).
        ip_maps (`dict[str, dict[int, torch.Tensor]]`): layer → adapter → maps of the image-prompt
            tokens (``capture(..., ip_tokens=...)``); ``ip_steps`` per call (``accumulate="list"``).
        grids (`dict[str, tuple[int, int]]`): layer name → (h, w) of its query grid.
        lengths (`tuple[int, ...]` or `None`): text tokens per row (S_b; ragged rows are padded
            with zero maps); ``None`` when only image-prompt tokens were asked for.
        head_reduce (`str`): ``"mean"`` or ``"none"``.
        num_calls (`int`): UNet calls seen inside the block.
    """

    def __init__(self, lengths: Optional[Tuple[int, ...]], head_reduce: str, accumulate: str = "last",
                 ip_tokens: Optional[IPTokens] = None):
        super().__init__(accumulate)
        self._ip_tokens = ip_tokens
        self.lengths = lengths
        self.head_reduce = head_reduce

    def _store(self, call: int, name: str, value: Tensor, grid: Optional[Grid], maps=None) -> None:
        self._put_map(call, name, value, grid)


class SubjectLossRecorder(_Recorder):
    r"""Losses recorded by :meth:`SemfidController.subject_loss` (the last call's).

    Attributes:
        layer_losses (`dict[str, torch.Tensor]`): layer name → [B] float32 loss of
            :func:`semfid.subject_attention` in that layer, in run order.
        loss (`torch.Tensor` [B]): mean of ``layer_losses`` over the layers.
        maps: the target maps ``A_t`` of each layer, from the same fused pass (``keep_maps=True``);
            differentiable, for :mod:`semfid.losses`.
        num_calls (`int`): UNet calls seen inside the block.
    """

    _BLOCK = "subject_loss"

    def __init__(self):
        super().__init__("last")
        self._losses = _Series("last")

    def _store(self, call: int, name: str, value: Tensor, grid: Optional[Grid], maps=None) -> None:
        self._losses.put(call, name, value)
        if maps is not None:
            self._put_map(call, name, maps, grid)

    @property
    def layer_losses(self) -> Dict[str, Tensor]:
        self._require_call("layer_losses")
        return self._losses.current()

    @property
    def loss(self) -> Tensor:
        """[B] float32: mean over the chosen layers of the per-layer loss."""
        self._require_call("loss")
        return torch.stack(list(self._losses.current().values())).mean(dim=0)


__all__ = ["AttentionRecorder", "SubjectLossRecorder", "NoCallError"]
