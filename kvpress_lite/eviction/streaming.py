"""StreamingLLM: attention sinks plus a window of the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .policy import EvictionPolicy, ScoreInputs
from .registration import register_policy


@register_policy("streaming", "StreamingLLM: `sinks` first tokens + most recent tokens")
@dataclass
class StreamingPolicy(EvictionPolicy):
    """StreamingLLM, Xiao et al. 2023, https://arxiv.org/abs/2309.17453

    Score = the token's position, so the most recent tokens win; the `sinks` first real tokens are protected by the
    layer (paper: 4 sinks). A cache of budget b keeps the sinks and the last b - sinks tokens. Kept keys stay at their
    original rotation (the paper re-rotates into the cache; exact-position RoPE is what transformers models expect).
    """

    per_head = False  # no ranking to compare across kv heads: per-head budgets (adaptive=True) do not apply

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """`[batch, kv_heads, seq]` logical positions."""
        return inputs.positions.float()
