"""The reference pass of the subject-wise loss in joint blocks (SD3, Flux).

In a UNet (or PixArt) layer the reference keys are ``to_k(reference text states)``. In a joint block
the text stream itself changes from block to block (it attends to the image), so the reference keys
of layer L are the text keys that layer L computes in a forward pass *with the reference prompt*:
same latents, timestep, guidance, pooled projections and image ids, the reference prompt's
``encoder_hidden_states`` (Flux: ``txt_ids`` of zeros when the length differs). The controller runs
that pass once per model call in a ``subject_loss`` block, under ``torch.no_grad()`` (one extra
forward without a graph per step), and the processors record their text keys
([B, H, M_ref, D], after qk-norm and RoPE, exactly as the layer attends with them). The keys
travel to the loss pass in ``joint_attention_kwargs["semfid_ref_keys"]``, so gradient
checkpointing's recompute reuses them.
"""

from __future__ import annotations

from typing import Any, Dict, FrozenSet, Optional

import torch

Tensor = torch.Tensor

#: joint_attention_kwargs key: the :class:`ReferenceRecord` a reference pass fills
RECORD_KWARG = "semfid_ref_record"
#: joint_attention_kwargs key: {layer name: reference text keys [B, H, M_ref, D]} of the loss pass
KEYS_KWARG = "semfid_ref_keys"


class ReferenceRecord:
    """Where the processors of one reference pass put their text keys (per layer)."""

    def __init__(self, owner: object, layers: FrozenSet[str]):
        self.owner = owner
        self.layers = layers
        self.keys: Dict[str, Tensor] = {}

    def put(self, name: str, owner: object, keys: Tensor) -> None:
        """Keep ``keys`` [B, H, M_ref, D] of layer ``name`` if this pass was asked for it."""
        if owner is self.owner and name in self.layers:
            self.keys[name] = keys.detach()


def reference_keys(model: torch.nn.Module, family, call: Dict[str, Any], request, owner: object
                   ) -> Dict[str, Tensor]:
    r"""Run the reference pass of one model call and return every chosen layer's reference keys.

    Args:
        model: the installed transformer; family: its :class:`~.base.Family`.
        call (`dict`): the model call's arguments by name.
        request: the active ``LossRequest`` (``reference_states`` [B or 1, M_ref, C], ``layers``).
        owner: the controller's identity token.

    Raises:
        ValueError: ``reference_states`` is a per-layer dict (a joint model takes one reference
            prompt: the keys of every layer come from one forward).
        RuntimeError: a chosen layer recorded no keys (its processor was bypassed).
    """
    states = request.reference_states
    if isinstance(states, dict):
        raise ValueError(
            f"reference_states must be one tensor [B, M_ref, C] (the reference prompt's "
            f"encoder_hidden_states) for a {type(model).__name__}: the reference keys of every joint "
            "layer come from one forward with that prompt, not from per-layer states"
        )
    ehs = call["encoder_hidden_states"]
    if states.shape[0] != ehs.shape[0]:
        states = states.expand(ehs.shape[0], -1, -1)
    ref_call = dict(call)
    ref_call["encoder_hidden_states"] = states
    ref_call.update(family.reference_call(call, states.shape[1]))
    record = ReferenceRecord(owner, request.layers)
    kwargs = dict(call.get(family.kwargs_arg) or {})
    kwargs.update({RECORD_KWARG: record, **family.text_len_kwargs(states.shape[1])})
    ref_call[family.kwargs_arg] = kwargs
    with torch.no_grad():
        model(**ref_call)
    missing = sorted(request.layers.difference(record.keys))
    if missing:
        raise RuntimeError(f"{len(missing)} chosen layer(s) recorded no reference keys in the reference "
                           f"pass (e.g. {missing[0]}): their semfid processors were bypassed")
    return record.keys


def reference_for(name: str, ref_keys: Optional[Dict[str, Tensor]], batch: int) -> Tensor:
    """Layer ``name``'s reference keys [B, H, M_ref, D] from the call's ``semfid_ref_keys``."""
    k_ref = None if ref_keys is None else ref_keys.get(name)
    if k_ref is None:
        raise RuntimeError(f"layer {name}: the subject loss in a joint block needs the reference pass's "
                           f"keys ('{KEYS_KWARG}'); call the model, not the block, inside subject_loss")
    if k_ref.shape[0] != batch:
        raise ValueError(f"layer {name}: reference keys have batch {k_ref.shape[0]}, the call {batch}")
    return k_ref


__all__ = ["RECORD_KWARG", "KEYS_KWARG", "ReferenceRecord", "reference_keys", "reference_for"]
