"""What people use today to get cross-attention maps and an attention-map loss (DESIGN.md §5).

Written once, here; ``attn_speed.py``, ``train_step.py`` and the tests import them. Every
implementation provides up to three functions on [B, H, N, D] inputs (any strides):

``forward(q, k, v, scale) -> out``
    attention output only.
``forward_maps(q, k, v, tokens, scale) -> (out, maps)``
    plus the head-mean maps ``P[..., tokens]`` as float32 [B, N, S].
``subject(q, k, v, k_ref, tokens, scale) -> (out, loss)``
    plus SeFi-IDE's subject-wise loss ``mean((A_t − A_r)²)`` per batch row (float32 [B]), the
    reference maps ``A_r = softmax(q k_refᵀ·s)[..., tokens]`` detached (no gradient to q or k_ref);
    differentiable w.r.t. q, k and v. Same semantics as ``semfid.subject_attention``.

``tokens`` is an int64 tensor [S] of key indices shared by the batch. A function left as None is a
mode the implementation cannot do (e.g. ``sdpa_lse`` has no backward through its lse).

An implementation that compiles (``torch.compile``) declares a compile budget: the seconds its first
calls (one compilation per new shape) may take over one benchmark run before it stops being timed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

MODES = ("forward", "forward_maps", "subject_fwd_bwd")


@dataclass
class Implementation:
    """One way of computing the three modes; None marks a mode it does not do."""

    name: str
    forward: Optional[Callable] = None
    forward_maps: Optional[Callable] = None
    subject: Optional[Callable] = None
    description: str = ""
    #: A lower bound, not a competitor: computes the output only (no maps, no loss) in every mode.
    is_floor: bool = False
    #: (device, dtype) -> None when usable, else why not.
    unavailable: Callable[[torch.device, torch.dtype], Optional[str]] = field(
        default=lambda device, dtype: None
    )
    #: Seconds of first calls (compilation, one per new shape) allowed over one run; None for an
    #: implementation that does not compile (its first call is a plain warm-up).
    compile_budget_s: Optional[float] = None

    @property
    def compiles(self) -> bool:
        """True when the first call of each new shape compiles (minutes on a small CPU)."""
        return self.compile_budget_s is not None

    def function(self, mode: str) -> Optional[Callable]:
        return {"forward": self.forward, "forward_maps": self.forward_maps,
                "subject_fwd_bwd": self.subject}[mode]


def subject_loss(maps_t: Tensor, maps_r: Tensor) -> Tensor:
    """SeFi-IDE's subject-wise loss per batch row: mean of (A_t − A_r)² over every other dim."""
    return (maps_t - maps_r).square().flatten(1).mean(dim=1)


# ------------------------------------------------------------------------------------------------
# eager: explicit softmax(q kᵀ), maps gathered, autograd through everything (Prompt-to-Prompt's
# AttentionStore, FastComposer, Attend-and-Excite). Computed in the input dtype, as diffusers'
# ``Attention.get_attention_scores`` does.
# ------------------------------------------------------------------------------------------------
def eager_probabilities(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """softmax(q kᵀ · scale) [B, H, N, M] in the dtype of q."""
    return torch.matmul(q, k.transpose(-1, -2)).mul_(scale).softmax(dim=-1)


def eager_head_mean_maps(p: Tensor, tokens: Tensor) -> Tensor:
    """P[..., tokens] averaged over heads, float32 [B, N, S]."""
    return p.index_select(-1, tokens).float().mean(dim=1)


def eager_forward(q, k, v, scale):
    return torch.matmul(eager_probabilities(q, k, scale), v)


def eager_forward_maps(q, k, v, tokens, scale):
    p = eager_probabilities(q, k, scale)
    return torch.matmul(p, v), eager_head_mean_maps(p, tokens)


def eager_subject(q, k, v, k_ref, tokens, scale):
    p = eager_probabilities(q, k, scale)
    out = torch.matmul(p, v)
    maps_t = eager_head_mean_maps(p, tokens)
    with torch.no_grad():
        maps_r = eager_head_mean_maps(eager_probabilities(q, k_ref, scale), tokens)
    return out, subject_loss(maps_t, maps_r)


# ------------------------------------------------------------------------------------------------
# sdpa_augmented_v: V' = [V, E_sel] with one-hot columns E_sel for the selected keys, so SDPA's
# extra output columns are exactly P[..., tokens]; gradients flow through SDPA's own backward.
# The reference branch is a second SDPA with K_ref and V' = E_sel alone.
# ------------------------------------------------------------------------------------------------
_ALIGN = 8  # fused kernels want the value head dim to be a multiple of 8 (16 bytes in fp16)


def one_hot_columns(tokens: Tensor, num_keys: int, like: Tensor, extra: int = 0) -> Tensor:
    """[M, S + pad] with E[tokens[s], s] = 1, zero-padded so that ``extra + width`` is a multiple of 8."""
    S = tokens.numel()
    width = -(-(extra + S) // _ALIGN) * _ALIGN - extra
    e = torch.zeros(num_keys, width, dtype=like.dtype, device=like.device)
    e[tokens, torch.arange(S, device=like.device)] = 1
    return e


def _augmented_values(v: Tensor, tokens: Tensor) -> Tensor:
    B, H, M, Dv = v.shape
    e = one_hot_columns(tokens, M, v, extra=Dv)
    return torch.cat([v, e.expand(B, H, M, e.shape[1])], dim=-1)


def _sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def sdpa_forward(q, k, v, scale):
    # With no maps asked for there is nothing to append: plain SDPA.
    return _sdpa(q, k, v, scale)


def _sdpa_maps(q, k, v, tokens, scale, attention=_sdpa):
    Dv, S = v.shape[-1], tokens.numel()
    out_aug = attention(q, k, _augmented_values(v, tokens), scale)
    return out_aug[..., :Dv], out_aug[..., Dv:Dv + S].float().mean(dim=1)


def _sdpa_reference_maps(q, k_ref, tokens, scale, attention=_sdpa):
    B, H, M, _ = k_ref.shape
    e = one_hot_columns(tokens, M, k_ref)
    with torch.no_grad():
        return attention(q, k_ref, e.expand(B, H, M, e.shape[1]), scale)[..., :tokens.numel()].float().mean(dim=1)


def sdpa_augmented_v_forward_maps(q, k, v, tokens, scale):
    return _sdpa_maps(q, k, v, tokens, scale)


def sdpa_augmented_v_subject(q, k, v, k_ref, tokens, scale):
    out, maps_t = _sdpa_maps(q, k, v, tokens, scale)
    maps_r = _sdpa_reference_maps(q, k_ref, tokens, scale)
    return out, subject_loss(maps_t, maps_r)


# ------------------------------------------------------------------------------------------------
# sdpa_lse: output and logsumexp from a fused SDPA kernel, maps recomputed as
# exp(q k_selᵀ·s − lse). Forward only: the lse output of these kernels is not differentiable.
# ------------------------------------------------------------------------------------------------
def sdpa_with_lse(q: Tensor, k: Tensor, v: Tensor, scale: float):
    """(out [B, H, N, Dv], lse [B, H, N] fp32, natural log) from the fused SDPA kernel of the device."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)
    elif q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, scale=scale)[:2]
    return out, lse[..., :q.shape[2]].float()  # the efficient kernel pads lse to 32 rows


def _lse_maps(q, k, lse, tokens, scale):
    logits = torch.matmul(q, k.index_select(2, tokens).transpose(-1, -2)).float().mul_(scale)
    return logits.sub_(lse[..., None]).exp_().mean(dim=1)


def sdpa_lse_forward(q, k, v, scale):
    return sdpa_with_lse(q, k, v, scale)[0]


def sdpa_lse_forward_maps(q, k, v, tokens, scale):
    out, lse = sdpa_with_lse(q, k, v, scale)
    return out, _lse_maps(q, k, lse, tokens, scale)


def _sdpa_lse_unavailable(device, dtype):
    if device.type == "cuda" and not hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention"):
        return "this torch has no fused SDPA op returning the logsumexp"
    if device.type == "cpu" and not hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return "this torch has no CPU flash-attention op returning the logsumexp"
    return None


# ------------------------------------------------------------------------------------------------
# sdpa_floor: SDPA output only, no maps and no loss. Not a competitor: the lower bound a fused
# subject loss should approach (DESIGN.md §2).
# ------------------------------------------------------------------------------------------------
def sdpa_floor_subject(q, k, v, k_ref, tokens, scale):
    out = _sdpa(q, k, v, scale)
    return out, torch.zeros(q.shape[0], dtype=torch.float32, device=q.device)


# ------------------------------------------------------------------------------------------------
# xformers: memory_efficient_attention with the same augmented-V trick (it returns no maps either).
# ------------------------------------------------------------------------------------------------
def _xformers_attention(q, k, v, scale):
    import xformers.ops as xops  # imported lazily: optional dependency

    # xformers wants [B, N, H, D]; our [B, H, N, D] views come from that layout, so this is free.
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


def xformers_forward(q, k, v, scale):
    return _xformers_attention(q, k, v, scale)


def xformers_forward_maps(q, k, v, tokens, scale):
    return _sdpa_maps(q, k, v, tokens, scale, attention=_xformers_attention)


def xformers_subject(q, k, v, k_ref, tokens, scale):
    out, maps_t = _sdpa_maps(q, k, v, tokens, scale, attention=_xformers_attention)
    maps_r = _sdpa_reference_maps(q, k_ref, tokens, scale, attention=_xformers_attention)
    return out, subject_loss(maps_t, maps_r)


def _xformers_unavailable(device, dtype):
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed"
    if device.type != "cuda":
        return "xformers has no CPU kernels"
    try:
        import xformers.ops  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken install is a reason, not a crash
        return f"import xformers.ops failed: {exc}"
    return None


# ------------------------------------------------------------------------------------------------
# eager_compiled: torch.compile of the eager functions (static shapes: one graph per case).
# ------------------------------------------------------------------------------------------------
def _raise_recompile_limit(limit: int = 256) -> None:
    """Dynamo falls back to eager *silently* after too many recompiles of one function; every
    benchmark case is a new static shape, so lift the limit (the name changed across torch versions)."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))


_COMPILED: Dict[str, Callable] = {}
COMPILE_BUDGET_S = 180.0  # default allowance of a torch.compile baseline per run


def _compiled(fn: Callable) -> Callable:
    """``torch.compile(fn, dynamic=False)``, compiled on first use (importing costs nothing)."""
    def run(*args, **kwargs):
        if fn.__name__ not in _COMPILED:
            _raise_recompile_limit()
            _COMPILED[fn.__name__] = torch.compile(fn, dynamic=False)
        return _COMPILED[fn.__name__](*args, **kwargs)

    run.__name__ = f"compiled_{fn.__name__}"
    return run


# ------------------------------------------------------------------------------------------------
# flex_attention: torch's FlexAttention compiled, with its (differentiable) logsumexp; maps
# recomputed as exp(q k_selᵀ·s − lse), loss by autograd (DESIGN.md §8). The strongest composable
# peer a PyTorch user would write. On CPU, torch compiles it for inference only and without
# return_lse: those modes fail with NotImplementedError and are reported, not timed.
# ------------------------------------------------------------------------------------------------
def _flex_attention(q, k, v, scale, return_lse=False):
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, scale=scale, return_lse=return_lse)


def _flex(q, k, v, scale, return_lse=False):
    """The compiled flex_attention; under no_grad on inputs detached, as inference code has them
    (flex checks ``requires_grad``, not the grad mode, before refusing a CPU backward)."""
    if not torch.is_grad_enabled():
        q, k, v = q.detach(), k.detach(), v.detach()
    return _flex_compiled(q, k, v, scale, return_lse)


_flex_compiled = _compiled(_flex_attention)


def flex_forward(q, k, v, scale):
    return _flex(q, k, v, scale)


def flex_forward_maps(q, k, v, tokens, scale):
    out, lse = _flex(q, k, v, scale, True)
    return out, _lse_maps(q, k, lse, tokens, scale)


def flex_subject(q, k, v, k_ref, tokens, scale):
    out, lse = _flex(q, k, v, scale, True)
    maps_t = _lse_maps(q, k, lse, tokens, scale)  # differentiable through q, k and lse
    with torch.no_grad():
        # only lse_ref is needed: k_ref stands in for the values (same shape, output unused)
        _, lse_ref = _flex(q, k_ref, k_ref, scale, True)
        maps_r = _lse_maps(q, k_ref, lse_ref, tokens, scale)
    return out, subject_loss(maps_t, maps_r)


def _flex_unavailable(device, dtype):
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return "this torch has no torch.nn.attention.flex_attention"
    return None


def _compile_unavailable(device, dtype):
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    return None


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------
BASELINES: Dict[str, Implementation] = {
    impl.name: impl
    for impl in [
        Implementation(
            "eager", eager_forward, eager_forward_maps, eager_subject,
            "explicit softmax(QKᵀ), maps gathered, autograd (Prompt-to-Prompt / FastComposer style)",
        ),
        Implementation(
            "sdpa_augmented_v", sdpa_forward, sdpa_augmented_v_forward_maps, sdpa_augmented_v_subject,
            "SDPA with one-hot columns appended to V (plain SDPA in forward mode)",
        ),
        Implementation(
            "sdpa_lse", sdpa_lse_forward, sdpa_lse_forward_maps, None,
            "fused SDPA output + logsumexp, maps recomputed as exp(q·k_selᵀ·s − lse); forward only",
            unavailable=_sdpa_lse_unavailable,
        ),
        Implementation(
            "xformers", xformers_forward, xformers_forward_maps, xformers_subject,
            "xformers memory_efficient_attention with the augmented-V trick",
            unavailable=_xformers_unavailable,
        ),
        Implementation(
            "eager_compiled", _compiled(eager_forward), _compiled(eager_forward_maps),
            _compiled(eager_subject), "torch.compile(eager), static shapes",
            unavailable=_compile_unavailable, compile_budget_s=COMPILE_BUDGET_S,
        ),
        Implementation(
            "flex_attention", flex_forward, flex_forward_maps, flex_subject,
            "torch.compile(flex_attention, return_lse=True), maps exp(q·k_selᵀ·s − lse), autograd",
            unavailable=_flex_unavailable, compile_budget_s=COMPILE_BUDGET_S,
        ),
        Implementation(
            "sdpa_floor", None, None, sdpa_floor_subject,
            "SDPA output only, no maps, no loss: the floor (not a competitor)", is_floor=True,
        ),
    ]
}


def baseline_implementations(names: Optional[List[str]] = None) -> List[Implementation]:
    """The baselines, in table order (all of them, or those named)."""
    if names is None:
        return list(BASELINES.values())
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choices: {sorted(BASELINES)}")
    return [BASELINES[n] for n in names]
