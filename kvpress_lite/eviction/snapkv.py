"""SnapKV: keep the tokens an observation window of the latest queries attends to, pooled to keep neighbours."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .policy import EvictionPolicy, ScoreInputs
from .registration import register_policy


@register_policy("snapkv", "SnapKV: pooled attention of the prompt's last `window` queries")
@dataclass
class SnapKVPolicy(EvictionPolicy):
    """SnapKV, Li et al. 2024, https://arxiv.org/abs/2404.14469

    At prefill, score = attention mass from the prompt's last `window` queries (the observation window), summed over
    the query heads of each kv head, then max-pooled along the sequence with `kernel` so that clusters survive whole.
    The paper compresses once, after prefill; here decoding evicts too, so each decoded query's pooled attention is
    added to the scores (SnapKV's criterion, accumulated like H2O's, over a window of the queries seen since).

    Args:
        window: observation window, in most recent queries of a forward (paper: 32).
        kernel: odd max-pooling width along the sequence (paper: 7; 1 disables pooling).
    """

    window: int = 32
    kernel: int = 7
    uses_attention = True

    def __post_init__(self):
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window={self.window!r} must be an integer >= 1 (queries in the observation window)")
        if not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel={self.kernel!r} must be an odd integer >= 1 (max-pooling width)")

    @property
    def attention_window(self) -> int:
        return self.window

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """`previous + maxpool(attention)`: `[batch, kv_heads, seq]`."""
        pooled = F.max_pool1d(inputs.attention, self.kernel, stride=1, padding=self.kernel // 2)  # (B, Hkv, P)
        return inputs.previous + pooled
