"""The learned subject: S stage pairs (P^K, P^V) of n token embeddings each, per text encoder.

SeFi-IDE represents the placeholder ``V*`` not by one embedding but by one (key, value) pair of token
embeddings per *stage* of the diffusion process; ``stage = floor(t · S / T)`` for timestep ``t`` of
``T`` training timesteps. In ``"attention"`` mode (the paper's) a small trainable self-attention block
turns the initializer word's embedding into all 2·S·n vectors at once; in ``"direct"`` mode the vectors
are free parameters initialised from that embedding.

SDXL has two text encoders with different token-embedding widths: the module holds one generator per
encoder and returns one set of pairs per encoder.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
from torch import nn

Tensor = torch.Tensor

MODES = ("attention", "direct")


def stage_of(timesteps: Union[Tensor, int, float], num_stages: int,
             num_train_timesteps: int = 1000) -> Tensor:
    r"""Stage index of each timestep: ``floor(t · S / T)``, clamped to ``[0, S - 1]``.

    Args:
        timesteps (`Tensor` [B] or scalar): diffusion timesteps in ``[0, T)`` (float timesteps, as
            some schedulers use at inference, are allowed).
        num_stages (`int`): S.
        num_train_timesteps (`int`, *optional*, defaults to 1000): T, the scheduler's
            ``num_train_timesteps``.

    Returns:
        `Tensor` [B] (or a 0-d tensor for a scalar) of int64 stage indices.
    """
    t = torch.as_tensor(timesteps)
    stage = torch.floor(t.double() * num_stages / num_train_timesteps).long()
    return stage.clamp_(0, num_stages - 1)


def _num_heads(width: int) -> int:
    for heads in (8, 4, 2, 1):
        if width % heads == 0 and width // heads >= 4:
            return heads
    return 1


class StagePairGenerator(nn.Module):
    r"""One self-attention block that maps an initializer embedding to 2·S·n token embeddings.

    The input sequence is ``init + slot_j`` for the 2·S·n learned slot embeddings (one per stage, role
    K/V and vector), in units of the initializer's scale; a pre-norm transformer block (self-attention
    then MLP) mixes it; a zero-initialised output projection turns it into offsets, so every P starts
    exactly at the initializer embedding:
    ``P_j = init + scale · W_out(block((init + scale · slot_j) / scale))``.

    Args:
        init (`Tensor` [d]): initializer word embedding (a frozen buffer).
        num_stages (`int`): S.
        num_vectors (`int`): n, vectors per P.
    """

    def __init__(self, init: Tensor, num_stages: int, num_vectors: int):
        super().__init__()
        width = init.numel()
        self.num_stages, self.num_vectors = num_stages, num_vectors
        scale = init.float().std().clamp_min(1e-6)
        self.register_buffer("init", init.detach().float().reshape(width).clone())
        self.register_buffer("scale", scale.reshape(()).clone())
        self.slots = nn.Parameter(torch.randn(2 * num_stages * num_vectors, width) * 0.02)
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, _num_heads(width), batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.out = nn.Linear(width, width)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self) -> Tensor:
        """All pairs as [S, 2, n, d] (index 0 of dim 1 = P^K, 1 = P^V), float32."""
        x = (self.init / self.scale + self.slots).unsqueeze(0)  # [1, 2Sn, d]
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.norm2(x))
        pairs = self.init + self.scale * self.out(x[0])
        return pairs.reshape(self.num_stages, 2, self.num_vectors, -1)


class DirectPairs(nn.Module):
    r"""Free parameters [S, 2, n, d] initialised from the initializer embedding.

    Args:
        init (`Tensor` [d]): initializer word embedding.
        num_stages (`int`): S.
        num_vectors (`int`): n, vectors per P.
    """

    def __init__(self, init: Tensor, num_stages: int, num_vectors: int):
        super().__init__()
        width = init.numel()
        value = init.detach().float().reshape(1, 1, 1, width).expand(num_stages, 2, num_vectors, width)
        self.pairs = nn.Parameter(value.clone())

    def forward(self) -> Tensor:
        """All pairs as [S, 2, n, d], float32."""
        return self.pairs


class SefiTokens(nn.Module):
    r"""The trainable SeFi-IDE token module of one placeholder.

    Args:
        init_embeddings (`Sequence[Tensor]`): the initializer word's token embedding for each text
            encoder, [d_e] each (one for SD1.5, two for SDXL).
        num_stages (`int`, *optional*, defaults to 5): S, the number of timestep stages.
        num_vectors (`int`, *optional*, defaults to 1): n, token embeddings per P^K / P^V.
        mode (`str`, *optional*, defaults to ``"attention"``): ``"attention"`` (self-attention
            generator, the paper's) or ``"direct"`` (free parameters).

    Example:

    ```python
    >>> tokens = SefiTokens([init_embedding], num_stages=5)
    >>> (keys, values), = tokens(stage_of(timesteps, 5))   # [B, n, d] each, one pair per encoder
    ```
    """

    def __init__(self, init_embeddings: Sequence[Tensor], num_stages: int = 5, num_vectors: int = 1,
                 mode: str = "attention"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if int(num_stages) < 1 or int(num_vectors) < 1:
            raise ValueError(f"num_stages and num_vectors must be >= 1, got {num_stages}, {num_vectors}")
        if len(init_embeddings) == 0:
            raise ValueError("init_embeddings must hold one embedding per text encoder, got none")
        self.num_stages, self.num_vectors, self.mode = int(num_stages), int(num_vectors), mode
        self.widths = [int(e.numel()) for e in init_embeddings]  # token-embedding width per encoder
        cls = StagePairGenerator if mode == "attention" else DirectPairs
        self.generators = nn.ModuleList(cls(e, self.num_stages, self.num_vectors) for e in init_embeddings)

    def all_pairs(self) -> List[Tensor]:
        """Every stage's pair for each text encoder: a list of [S, 2, n, d_e] float32 tensors."""
        return [g() for g in self.generators]

    def forward(self, stages: Tensor) -> List[Tuple[Tensor, Tensor]]:
        r"""The (P^K, P^V) pair of each sample's stage.

        Args:
            stages (`Tensor` [B]): stage indices (see :func:`stage_of`).

        Returns:
            `list` with one ``(keys, values)`` tuple per text encoder, each [B, n, d_e] float32.
        """
        stages = stages.reshape(-1).long()
        out = []
        for pairs in self.all_pairs():
            chosen = pairs[stages.to(pairs.device)]  # [B, 2, n, d]
            out.append((chosen[:, 0], chosen[:, 1]))
        return out


def fixed_pairs(pairs: Sequence[Tensor], stages: Tensor) -> List[Tuple[Tensor, Tensor]]:
    r"""Pick stage pairs from saved tensors, like :meth:`SefiTokens.forward` does from the module.

    Args:
        pairs (`Sequence[Tensor]`): per text encoder [S, 2, n, d_e].
        stages (`Tensor` [B]): stage indices.

    Returns:
        `list` of ``(keys, values)`` per text encoder, each [B, n, d_e].
    """
    stages = stages.reshape(-1).long()
    return [(p[stages.to(p.device), 0], p[stages.to(p.device), 1]) for p in pairs]


__all__ = ["SefiTokens", "StagePairGenerator", "DirectPairs", "stage_of", "fixed_pairs", "MODES"]
