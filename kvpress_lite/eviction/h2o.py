"""H2O: keep the heavy hitters, the tokens with the largest attention mass accumulated over all queries."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .policy import EvictionPolicy, ScoreInputs
from .registration import register_policy


@register_policy("h2o", "H2O heavy hitters: largest accumulated attention mass + sinks + recent window")
@dataclass
class H2OPolicy(EvictionPolicy):
    """Heavy-Hitter Oracle, Zhang et al. 2023, https://arxiv.org/abs/2306.14048

    Score of a cached token = sum, over every query that has attended to it since it entered the cache (prompt
    queries included), of its softmax probability, summed over the query heads sharing its kv head (GQA). Tokens keep
    their score after surviving an eviction, so the sum is over the token's whole life, as in the paper's greedy
    algorithm. Each kv head evicts on its own. Pair with `recent` > 0: a new token's mass is tiny at first.

    Args:
        average: rank by the mean instead of the sum: the mass divided by the number of queries that could attend to
            the token (L - its position). The sum favours old tokens, which more queries have seen (under a causal
            mask the first prompt token is seen by every query, the last by one); the mean removes that bias, as
            kvpress' ObservedAttentionPress does. Default False: the paper's sum.
    """

    average: bool = False

    uses_attention = True
    attention_window = None  # every query of every forward

    def __post_init__(self):
        if not isinstance(self.average, bool):
            raise ValueError(f"average={self.average!r} must be True (mean attention) or False (sum, the paper's)")

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """`[batch, kv_heads, seq]` accumulated attention mass (`previous + attention`), or its mean per query."""
        if not self.average:
            return inputs.previous + inputs.attention
        seen_by = (inputs.length - inputs.positions).float()  # queries at or after each slot's position, >= 1
        seen_before = (seen_by - inputs.query_length).clamp(min=0)  # 0 for the slots this forward added
        return (inputs.previous * seen_before + inputs.attention) / seen_by
