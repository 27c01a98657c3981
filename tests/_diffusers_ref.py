"""Explicit-softmax reference processor for the diffusers tests (independent of semfid's code).

``softmax(q kᵀ · attn.scale + mask)`` is materialised per layer, maps are gathered from it and the
subject-wise loss is computed with autograd through it, the way Prompt-to-Prompt-style training
code does. It handles what the SD1.5 / SDXL UNets use (3D hidden states, additive [B, 1, M] masks,
no spatial/group/cross norms) and refuses anything else, so a silent mismatch cannot creep in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch


@dataclass
class RefState:
    """What the reference processors do; set it before the forward, read it after."""

    active: Optional[set] = None  # attn2 layer names that capture / compute the loss (None: all)
    tokens: Optional[torch.Tensor] = None  # [S] or [B, S]: capture (and target-loss) positions
    head_reduce: str = "mean"
    reference_states: object = None  # tensor [B|1, M_ref, C] or {layer: tensor}; enables the loss
    ref_tokens: Optional[torch.Tensor] = None
    ref_mask_bias: Optional[torch.Tensor] = None  # [B|1, 1, M_ref] additive, overrides reuse
    value_states: object = None  # tensor or {layer: tensor}
    maps: Dict[str, torch.Tensor] = field(default_factory=dict)
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)

    def is_active(self, name: str) -> bool:
        return self.active is None or name in self.active


def _pick(states, name):
    return states.get(name) if isinstance(states, dict) else states


def _ragged(tokens) -> bool:
    return isinstance(tokens, (list, tuple)) and len({len(r) for r in tokens}) > 1


def _gather(p: torch.Tensor, tokens: torch.Tensor, head_reduce: str) -> torch.Tensor:
    B, H, N, _ = p.shape
    if _ragged(tokens):  # per-row lists of different lengths: zero maps in the padding columns
        width = max(len(r) for r in tokens)
        maps = p.new_zeros(B, H, N, width)
        for b, row in enumerate(tokens):
            maps[b, :, :, : len(row)] = p[b][:, :, list(row)]
        return maps.mean(dim=1) if head_reduce == "mean" else maps
    idx = torch.as_tensor(tokens, dtype=torch.long, device=p.device)
    if idx.dim() == 1:
        idx = idx.expand(B, -1)
    maps = torch.stack([p[b][:, :, idx[b]] for b in range(B)])  # [B, H, N, S]
    return maps.mean(dim=1) if head_reduce == "mean" else maps


class ExplicitSoftmaxProcessor:
    """Reference attention processor: explicit probabilities, maps and loss through autograd."""

    def __init__(self, name: str, state: RefState):
        self.name = name
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        if (hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None
                or attn.norm_cross or attn.norm_q is not None or attn.norm_k is not None):
            raise NotImplementedError("reference processor covers SD-style attention layers only")
        st = self.state
        cross = encoder_hidden_states is not None
        active = cross and st.is_active(self.name)
        context = encoder_hidden_states if cross else hidden_states
        values_in = context
        if active and _pick(st.value_states, self.name) is not None:
            values_in = _pick(st.value_states, self.name)

        B, N, _ = hidden_states.shape
        H = attn.heads

        def heads(x):
            return x.reshape(x.shape[0], x.shape[1], H, -1).permute(0, 2, 1, 3)

        q = heads(attn.to_q(hidden_states))
        k = heads(attn.to_k(context))
        v = heads(attn.to_v(values_in)).expand(B, -1, -1, -1)

        bias = None
        if attention_mask is not None:
            if attention_mask.dim() != 3 or attention_mask.shape[1] != 1:
                raise NotImplementedError("reference processor takes [B, 1, M] key-padding biases")
            bias = attention_mask[:, :, None, :].to(q.dtype)  # [B, 1, 1, M]

        logits = torch.einsum("bhnd,bhmd->bhnm", q, k) * attn.scale
        if bias is not None:
            logits = logits + bias
        p = torch.softmax(logits, dim=-1)
        out = torch.einsum("bhnm,bhmd->bhnd", p, v)

        if active and st.tokens is not None:
            a_t = _gather(p, st.tokens, st.head_reduce)
            refs = _pick(st.reference_states, self.name)
            if refs is not None:
                k_ref = heads(attn.to_k(refs)).expand(B, -1, -1, -1).detach()
                logits_ref = torch.einsum("bhnd,bhmd->bhnm", q.detach(), k_ref) * attn.scale
                if st.ref_mask_bias is not None:
                    logits_ref = logits_ref + st.ref_mask_bias[:, :, None, :].to(q.dtype)
                elif bias is not None and k_ref.shape[2] == k.shape[2]:
                    logits_ref = logits_ref + bias
                p_ref = torch.softmax(logits_ref, dim=-1)
                ref_tokens = st.tokens if st.ref_tokens is None else st.ref_tokens
                a_r = _gather(p_ref, ref_tokens, st.head_reduce)
                acc = torch.float64 if q.dtype == torch.float64 else torch.float32
                d2 = (a_t.to(acc) - a_r.to(acc)).pow(2)
                if _ragged(st.tokens):  # each row averaged over its own tokens only
                    st.losses[self.name] = torch.stack(
                        [d2[b, ..., : len(r)].mean() for b, r in enumerate(st.tokens)])
                else:
                    st.losses[self.name] = d2.reshape(B, -1).mean(dim=1)
            else:
                st.maps[self.name] = a_t

        out = out.permute(0, 2, 1, 3).reshape(B, N, -1).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def install_reference(unet, state: RefState) -> dict:
    """Put an :class:`ExplicitSoftmaxProcessor` on every attention module; return the old ones."""
    old = dict(unet.attn_processors)
    unet.set_attn_processor({k: ExplicitSoftmaxProcessor(k[: -len(".processor")], state) for k in old})
    return old
