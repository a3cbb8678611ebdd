"""H2O: keep the heavy hitters, the tokens with the largest attention mass accumulated over all queries."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .policy import EvictionPolicy, ScoreInputs, register_policy


@register_policy("h2o", "H2O heavy hitters: largest accumulated attention mass + sinks + recent window")
@dataclass
class H2OPolicy(EvictionPolicy):
    """Heavy-Hitter Oracle, Zhang et al. 2023, https://arxiv.org/abs/2306.14048

    Score of a cached token = sum, over every query that has attended to it since it entered the cache (prompt
    queries included), of its softmax probability, summed over the query heads sharing its kv head (GQA). Tokens keep
    their score after surviving an eviction, so the sum is over the token's whole life, as in the paper's greedy
    algorithm. Each kv head evicts on its own. Pair with `recent` > 0: a new token's mass is tiny at first.
    """

    uses_attention = True
    attention_window = None  # every query of every forward

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """`previous + attention`: `[batch, kv_heads, seq]` accumulated attention mass."""
        return inputs.previous + inputs.attention
