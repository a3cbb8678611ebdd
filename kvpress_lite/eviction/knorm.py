"""KNorm: keep the tokens whose keys have the smallest L2 norm (they draw the most attention)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .policy import EvictionPolicy, ScoreInputs
from .registration import register_policy


@register_policy("knorm", "KNorm: smallest key L2 norm, attention-free")
@dataclass
class KNormPolicy(EvictionPolicy):
    """L2-norm eviction, Devoto et al. 2024, https://arxiv.org/abs/2406.11430

    Low-norm keys correlate with high attention, so score = -||k||_2 of each cached (rotated) key. Needs no attention,
    so it is scored only when the layer evicts.
    """

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """`[batch, kv_heads, seq]` negated key norms."""
        return -inputs.keys.float().norm(dim=-1)
