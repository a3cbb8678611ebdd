"""TOVA: keep the tokens the current query attends to most."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .policy import EvictionPolicy, ScoreInputs
from .registration import register_policy


@register_policy("tova", "TOVA: attention of the latest query, averaged over heads")
@dataclass
class TOVAPolicy(EvictionPolicy):
    """Token Omission Via Attention, Oren et al. 2024, https://arxiv.org/abs/2401.06104

    Score = the most recent query's softmax attention to each cached token, averaged over all heads of the layer (the
    paper's best variant), so every kv head keeps the same tokens. Only the last forward's last query counts: TOVA is
    a Markov policy with no accumulated state. With `slack` > 0 the scores of the step that triggers the gather are
    used (the paper evicts one token per step, i.e. `slack=0`).
    """

    uses_attention = True
    attention_window = 1  # the last query only

    per_head = False  # no ranking to compare across kv heads: per-head budgets (adaptive=True) do not apply

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """`[batch, kv_heads, seq]` last-query attention, mean over kv heads (broadcast to every head)."""
        return inputs.attention.mean(dim=1, keepdim=True).expand_as(inputs.attention)
