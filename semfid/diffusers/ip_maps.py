"""Maps of the image-prompt tokens of IP-Adapter layers: ``capture(..., ip_tokens=...)``.

An IP-Adapter layer adds, per adapter ``a``, an attention of the layer's queries (the latent pixels)
over that adapter's image-prompt keys ``to_k_ip[a](img_a)`` (:mod:`semfid.diffusers.ip_adapter`).
Its probabilities ``softmax(q k_ipᵀ / √D)`` say which image-prompt tokens each region attends to;
``ip_tokens`` picks their columns, per adapter, on the adapter's *key axis*: the ``n_img · T`` keys of
``n_img`` images of ``T`` tokens each (``T`` = the adapter's ``num_tokens``: 4 plain / FaceID, 16
Plus), image ``j``'s token ``t`` at ``j · T + t``, the order diffusers concatenates them in.

The maps are the branch's probabilities: the adapter's ``scale`` (a layer with scale 0 still
records them, though diffusers skips its output) and the mask's weighting do not enter them. With
``ip_adapter_masks`` each image is attended separately (diffusers' masked path), so each image's
``T`` columns are a softmax of their own; without masks the ``n_img · T`` keys share one softmax.

Forms of ``ip_tokens`` (checked at block entry, :meth:`IPTokens.parse`):

* ``"all"``: every image-prompt key of every adapter;
* token positions as ``tokens`` takes them ([S], [B, S], ragged per-row lists, a tensor): the same
  positions in every adapter;
* ``{adapter index: "all" | positions}``: only the named adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .._inputs import TokenSelection
from ..ops import _zero_ragged_padding, attention_maps, cross_attention
from .token_specs import TokenSpec, bound

Tensor = torch.Tensor
ALL = "all"
Choice = Union[None, str, TokenSpec, TokenSelection]  # an adapter's request: nothing, ALL, positions


def check_ip_range(hi: int, num_keys: int, per_image: int, adapter: int, arg: str) -> None:
    """An index ``hi`` on adapter ``adapter``'s key axis of ``num_keys`` keys (ValueError if past it)."""
    if hi >= num_keys:
        images = num_keys // max(per_image, 1)
        raise ValueError(
            f"{arg} must index the {num_keys} image-prompt tokens of IP-Adapter {adapter} "
            f"(num_tokens={per_image} per image x {images} image(s): 0 ... {num_keys - 1}), got index {hi}"
        )


def _parse_one(tokens, arg: str) -> Union[str, TokenSpec]:
    if isinstance(tokens, str):
        if tokens != ALL:
            raise ValueError(f"{arg} must be 'all' or image-prompt token positions, got {tokens!r}")
        return ALL
    return TokenSpec.parse(tokens, arg)


@dataclass(frozen=True)
class IPTokens:
    """The image-prompt tokens a capture block asks for, per adapter.

    Attributes:
        default: what every adapter not in ``per_adapter`` gets (``None``: nothing).
        per_adapter (`tuple[(int, choice), ...]`): adapters named in a dict, in index order.

    A choice is ``"all"`` or a :class:`TokenSpec` at block entry, ``"all"`` or a placed
    :class:`TokenSelection` (the call's rows, not yet bounded) once :meth:`place`d per call.
    Only static values and tensors: a compiled model guards on nothing that changes per step.
    """

    default: Choice
    per_adapter: Tuple[Tuple[int, Choice], ...] = ()

    @classmethod
    def parse(cls, ip_tokens) -> "IPTokens":
        if isinstance(ip_tokens, dict):
            if not ip_tokens:
                raise ValueError("ip_tokens must name at least one adapter, got an empty dict")
            bad = [k for k in ip_tokens if not isinstance(k, int) or isinstance(k, bool) or k < 0]
            if bad:
                raise TypeError(f"ip_tokens keys must be adapter indices (ints >= 0, the order of "
                                f"load_ip_adapter's weight_name list), got {bad[0]!r}")
            return cls(None, tuple((a, _parse_one(t, f"ip_tokens[{a}]")) for a, t in sorted(ip_tokens.items())))
        if isinstance(ip_tokens, bool) or not isinstance(ip_tokens, (str, int, list, tuple, Tensor, TokenSelection)):
            raise TypeError(f"ip_tokens must be 'all', image-prompt token positions or a dict "
                            f"{{adapter index: 'all' | positions}}, got {ip_tokens!r}")
        return cls(_parse_one(ip_tokens, "ip_tokens"))

    def get(self, adapter: int) -> Choice:
        for a, choice in self.per_adapter:
            if a == adapter:
                return choice
        return self.default

    def _map(self, fn) -> "IPTokens":
        def each(c):
            return c if c is None or isinstance(c, str) else fn(c)

        return IPTokens(each(self.default), tuple((a, each(c)) for a, c in self.per_adapter))

    def to(self, device: torch.device) -> "IPTokens":
        return self._map(lambda spec: spec.to(device))

    def place(self, batch: int, device: torch.device) -> "IPTokens":
        """Per call: each selection on ``device`` with the call's rows (ranges come per layer)."""
        return self._map(lambda spec: spec.place(batch, device))

    def arg(self, adapter: int) -> str:
        return "ip_tokens" if self.default is not None and adapter not in dict(self.per_adapter) \
            else f"ip_tokens[{adapter}]"

    def check_adapters(self, layers: Dict[str, object], chosen: int) -> None:
        """Against the chosen IP-Adapter layers (name -> processor): adapters that exist."""
        if not layers:
            raise ValueError(
                f"ip_tokens needs IP-Adapter layers, but none of the {chosen} chosen layer(s) runs an "
                "IP-Adapter processor: load one first (pipe.load_ip_adapter(...)) or choose layers= with one"
            )
        count = min(len(p.num_tokens) for p in layers.values())
        for a, _ in self.per_adapter:
            if a >= count:
                raise ValueError(f"ip_tokens names IP-Adapter {a}, but the chosen layers hold {count} "
                                 f"adapter(s) (indices 0 ... {count - 1})")

    def check_call(self, adapter: int, num_keys: int, per_image: int) -> None:
        """The deferred range check of a traced call (:class:`~semfid.diffusers.recorders._Recorder`)."""
        choice = self.get(adapter)
        if isinstance(choice, TokenSpec):
            check_ip_range(choice.max_index, num_keys, per_image, adapter, self.arg(adapter))


# ------------------------------------------------------------------------------------------------
# the processor's side: one attention of an adapter's branch, with the maps its captures ask for
# ------------------------------------------------------------------------------------------------
def wanted(plan, adapter: int) -> List[tuple]:
    """``(item, choice)`` of each capture of ``plan`` asking for adapter ``adapter``'s maps."""
    found = []
    for item in () if plan is None else plan.ip_captures:  # (no walrus: Dynamo cannot trace it here)
        choice = item.ip.get(adapter)
        if choice is not None:
            found.append((item, choice))
    return found


def _everything(batch: int, num_keys: int, device) -> TokenSelection:
    index = torch.arange(num_keys, device=device).expand(batch, num_keys)
    return TokenSelection(index, None, (num_keys,) * batch, num_keys - 1)


def _fit(item, choice, adapter: int, num_keys: int, per_image: int) -> TokenSelection:
    """``choice`` bounded to ``num_keys`` keys (eagerly range-checked, naming the adapter)."""
    return bound(choice, num_keys, lambda hi: check_ip_range(hi, num_keys, per_image, adapter,
                                                             item.ip.arg(adapter)))


def _pick(maps: Tensor, sel: TokenSelection) -> Tensor:
    """``maps[..., sel]`` per row: [B, N, K] → [B, N, S] (or [B, H, N, K] → [B, H, N, S])."""
    index = sel.index[:, None, :] if maps.dim() == 3 else sel.index[:, None, None, :]
    picked = maps.gather(-1, index.expand(*maps.shape[:-1], sel.width))
    return _zero_ragged_padding(picked, sel)


def attend(query: Tensor, key: Tensor, value: Tensor, selects: List[Tuple[TokenSelection, str]],
           need_out: bool) -> Tuple[Optional[Tensor], List[Tensor]]:
    """One attention of the branch: ``out`` [B, H, N, D] (as diffusers' SDPA; ``None`` unless
    ``need_out``) and one map per ``(selection, head_reduce)``, the first from the same fused pass."""
    if not selects:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                              is_causal=False), []
    maps, out = [], None
    for i, (sel, head_reduce) in enumerate(selects):
        if i == 0 and need_out:
            out, m = cross_attention(query, key, value, select=sel, head_reduce=head_reduce)
        else:
            m = attention_maps(query, key, select=sel, head_reduce=head_reduce)
        maps.append(m)
    return out, maps


def record(items: Iterable[Tuple[object, Choice]], name: str, adapter: int, maps: Iterable[Tensor],
           num_keys: int, per_image: int) -> None:
    """Store each capture's maps once (a gradient-checkpoint recompute finds them and stores nothing)."""
    for (item, _), m in zip(items, maps):
        if (name, adapter) not in item.ip_results:
            item.ip_results[(name, adapter)] = (m, num_keys, per_image)


def unmasked(name: str, adapter: int, query: Tensor, key: Tensor, value: Tensor, want: List[tuple],
             per_image: int, need_out: bool) -> Optional[Tensor]:
    """The unmasked branch: one softmax over the adapter's ``n_img · T`` keys; returns ``out``."""
    num_keys, batch = key.shape[2], query.shape[0]
    selects = []
    for item, choice in want:
        sel = _everything(batch, num_keys, query.device) if choice == ALL else \
            _fit(item, choice, adapter, num_keys, per_image)
        selects.append((sel, item.head_reduce))
    out, maps = attend(query, key, value, selects, need_out)
    record(want, name, adapter, maps, num_keys, per_image)
    return out


def per_image_selects(want: List[tuple], query: Tensor, per_image: int) -> List[Tuple[TokenSelection, str]]:
    """Masked branch: every capture takes all ``T`` columns of each image's softmax (picked after)."""
    return [(_everything(query.shape[0], per_image, query.device), item.head_reduce) for item, _ in want]


def masked(name: str, adapter: int, want: List[tuple], image_maps: List[List[Tensor]], per_image: int) -> None:
    """Masked branch: each image was its own softmax over ``T`` keys (``image_maps[j][k]``: image
    ``j``'s maps for capture ``k``); each capture's columns of the concatenated [..., n_img · T]."""
    num_keys = per_image * len(image_maps)
    for k, (item, choice) in enumerate(want):
        full = torch.cat([maps[k] for maps in image_maps], dim=-1)
        m = full if choice == ALL else _pick(full, _fit(item, choice, adapter, num_keys, per_image))
        record([(item, choice)], name, adapter, [m], num_keys, per_image)


__all__ = ["ALL", "IPTokens", "check_ip_range", "wanted", "attend", "unmasked", "per_image_selects", "masked"]
