"""What the ``with`` blocks return: recorded maps and losses, with loud errors and accumulation.

A recorder is filled by the processors during the UNet calls inside its block and read after it.
Reading before any UNet call ran raises :class:`NoCallError` (a ``RuntimeError``) naming the cause,
instead of handing back ``None`` or an empty dict.

Accumulation over the calls of a block (``capture(..., accumulate=...)``):

* ``"last"`` (default): each call replaces the previous one's values;
* ``"mean"``: a running mean over the calls (e.g. over a pipeline's denoising steps);
* ``"list"``: every call kept, ``rec.steps[i]`` is call i's ``{layer: map}`` dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

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
        self._head = head
        for entry in calls:
            call, self._calls = self._calls, self._calls + 1
            for name, (value, maps) in entry["results"].items():
                self._store(call, name, value, entry["grids"].get(name), maps)

    def _store(self, call: int, name: str, value: Tensor, grid: Optional[Grid], maps=None) -> None:
        raise NotImplementedError

    def _require_call(self, what: str) -> None:
        if self.num_calls == 0:
            raise NoCallError(
                f"{type(self).__name__}.{what}: no UNet call ran inside the `with ctl.{self._BLOCK}(...)` "
                "block, so nothing was recorded. Call the UNet (or the pipeline) inside the block; "
                "the values can be read after it has exited."
            )

    def _put_map(self, call: int, name: str, value: Tensor, grid: Optional[Grid]) -> None:
        self._maps.put(call, name, value)
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
            raise NoCallError(f"{type(self).__name__}.maps: the block recorded no maps "
                              "(subject_loss records them only with keep_maps=True)")
        return maps

    @property
    def steps(self) -> List[Dict[str, Tensor]]:
        """Every call's ``{layer: map}`` dict, in call order (``accumulate="list"`` only)."""
        self._require_call("steps")
        if self.accumulate != "list":
            raise ValueError(f"steps needs capture(..., accumulate='list'); this recorder has "
                             f"accumulate={self.accumulate!r}")
        return list(self._maps.steps)

    @property
    def resolutions(self) -> List[Grid]:
        """The distinct (h, w) grids among the captured layers, largest first."""
        return sorted(set(self.grids.values()), key=lambda g: (-g[0] * g[1], g))

    def aggregate(self, res: Union[int, Grid] = 16, step: Optional[int] = None) -> Tensor:
        r"""Mean over the captured layers whose query grid is ``res``, as images.

        Args:
            res (`int` or `tuple[int, int]`, *optional*, defaults to 16): grid side (square) or
                (h, w). SD1.5 at 512 px has 64, 32, 16 and 8 (mid block); SDXL at 1024 px 64 / 32.
            step (`int`, *optional*): with ``accumulate="list"``, that call's maps (default: the
                accumulated / last ones).

        Returns:
            `torch.Tensor` [B, S, h, w] float32; per-head maps are averaged over heads first.

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
        maps = self.maps if step is None else self.steps[step]
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
                      columns: Optional[int] = None):
        r"""Save row ``row``'s per-token maps as one labelled grid image (DAAM / Prompt-to-Prompt style).

        Args:
            path: the PNG to write (e.g. beside the generated image: ``out.png`` → ``out-maps.png``).
            image (`PIL.Image.Image`, *optional*): the generated image, shown first and under each map.
            labels (*optional*): one label per captured token (e.g. ``AlignedTokens.labels[row]``);
                defaults to the token positions.
            res, step: as in :meth:`aggregate`.

        Returns:
            `PIL.Image.Image`: the grid that was written.
        """
        from .heatmaps import heatmap_grid

        heat = self.aggregate(res, step=step)
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
        grids (`dict[str, tuple[int, int]]`): layer name → (h, w) of its query grid.
        tokens (`tuple[int, ...]`): tokens per row (S_b; ragged rows are padded with zero maps).
        head_reduce (`str`): ``"mean"`` or ``"none"``.
        num_calls (`int`): UNet calls seen inside the block.
    """

    def __init__(self, lengths: Tuple[int, ...], head_reduce: str, accumulate: str = "last"):
        super().__init__(accumulate)
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
