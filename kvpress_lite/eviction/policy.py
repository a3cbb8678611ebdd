"""Eviction policies rank cached tokens; `EvictionLayer` owns top-k, gather and the budget.

A policy is a dataclass with one method, `score(inputs) -> [batch, kv_heads, seq]` (higher = keep), plus two class
attributes saying what it needs to see. Registering it with `@register_policy("name", summary)` (in
`eviction/registration.py`) makes it available as `EvictionCache(model, policy="name")` and as strategy "name"
(family "eviction") in `kvpress_lite.registry`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

POLICIES: dict[str, type[EvictionPolicy]] = {}
MAX_SLACK = 16  # upper bound of the default slack (tokens stored above the budget before a gather)


@dataclass
class ScoreInputs:
    """What a policy may read when scoring one layer's `P` cached slots.

    Args:
        keys: `[batch, kv_heads, P, head_dim]` rotated keys (RoPE applied), as stored.
        values: `[batch, kv_heads, P, head_dim]`.
        positions: `[batch, kv_heads, P]` int, logical index of each slot's token (pads included; increasing along P).
        attention: `[batch, kv_heads, P]` fp32, softmax probabilities summed over this forward's last
            `attention_window` queries and over the query heads of each kv head; None when `uses_attention` is False.
        previous: `[batch, kv_heads, P]` fp32, the scores this policy returned last time, 0 for slots added by this
            forward; None when `uses_attention` is False.
        length: logical length L after this forward (tokens seen, evicted ones included).
        query_length: queries in this forward (q); the slots they added are the last q.
        queries: `[batch, q_heads, w, head_dim]` rotated queries of the `w <= query_window` most recent tokens
            (consecutive, the last one at L - 1), for policies with `query_window > 0`; else None.
        valid: `[batch, kv_heads, P]` bool, False for padding entries of a per-head view whose heads hold unequal
            numbers of slots (`adaptive=True`); None: every slot is real. Those entries' scores are discarded, but a
            policy that normalizes over the slots (softmax) must leave them out.
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    attention: torch.Tensor | None = None
    previous: torch.Tensor | None = None
    length: int | None = None
    query_length: int | None = None
    queries: torch.Tensor | None = None
    valid: torch.Tensor | None = None


@dataclass
class EvictionPolicy:
    """Base of all eviction policies: rank tokens, nothing else.

    Capabilities (class attributes):
        uses_attention: if True, `score` runs after every forward of the layer with `attention` and `previous` set,
            and its result is kept as the layer's scores (state such as H2O's accumulated mass lives there). If False,
            `score` runs only when the layer evicts, without attention.
        attention_window: how many of the most recent queries of a forward `attention` sums over (None: all of them).
        query_window: how many of the most recent rotated queries the layer keeps for `ScoreInputs.queries` (0: none).
        per_head: True if scores rank tokens comparably across kv heads, so per-head budgets (`adaptive=True`,
            AdaKV) can spread a layer's budget over its heads by score; False for position or random scores and for
            policies that share one ranking across heads (streaming, random, tova).
        attention_reduce: how `attention` combines a forward's queries and a kv head's query heads: "sum" (mass) or
            "max" (largest probability).
        rereads: True if the layer keeps the whole prompt until the cache has re-read it (KVzip, `eviction/kvzip.py`);
            eviction starts after that pass.
    """

    name: ClassVar[str] = ""
    uses_attention: ClassVar[bool] = False
    attention_window: ClassVar[int | None] = None
    query_window: ClassVar[int] = 0
    per_head: ClassVar[bool] = True
    attention_reduce: ClassVar[str] = "sum"
    rereads: ClassVar[bool] = False

    def prepare(self, model) -> None:
        """Read what the policy needs from the model once, when the cache is built (default: nothing)."""

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """Return `[batch, kv_heads, P]` scores; the layer keeps the highest-scored slots."""
        raise NotImplementedError


@dataclass
class EvictionBudget:
    """How many tokens an eviction layer keeps, shared by every policy.

    Args:
        budget: tokens kept per sequence and kv head (physical length after an eviction). Exclusive with `ratio`.
        ratio: budget as a fraction in (0, 1] of the prompt's length (pads included), rounded up. The prompt is every
            forward before the first single-token one, so chunked prefill (`generate(prefill_chunk_size=...)`) ends
            with the same budget as a single prefill forward, evicting chunk by chunk on the way.
        sinks: first real (non-pad) tokens of each sequence never evicted (attention sinks, StreamingLLM).
        recent: most recent tokens never evicted.
        slack: tokens stored above the budget before the next gather (amortizes the gather; memory swings by at
            most `slack` tokens). Default `min(16, budget // 32)`: under 3.2% of the budget.
    """

    budget: int | None = None
    ratio: float | None = None
    sinks: int = 4
    recent: int = 16
    slack: int | None = None

    def __post_init__(self):
        for name in ("sinks", "recent"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}={value!r} must be an integer >= 0")
        slack = self.slack
        if slack is not None and (not isinstance(slack, int) or isinstance(slack, bool) or slack < 0):
            raise ValueError(f"slack={self.slack!r} must be None (automatic) or an integer >= 0")
        if (self.budget is None) == (self.ratio is None):
            raise ValueError(
                f"pass exactly one of budget= (tokens kept) or ratio= (fraction of the prompt kept); got "
                f"budget={self.budget!r}, ratio={self.ratio!r}"
            )
        protected = self.sinks + self.recent
        if self.budget is not None:
            if not isinstance(self.budget, int) or isinstance(self.budget, bool) or self.budget < max(protected, 1):
                raise ValueError(
                    f"budget={self.budget!r} must be an integer >= max(1, sinks + recent) = {max(protected, 1)} "
                    f"(sinks={self.sinks}, recent={self.recent} tokens are never evicted)"
                )
        elif isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio <= 1:
            raise ValueError(f"ratio={self.ratio!r} must be a number in (0, 1] (fraction of the prompt kept)")

    def due(self, budget: int | None, in_prompt: bool) -> bool:
        """Whether a layer resolves its budget in this forward: its first, and every prompt forward of a ratio budget
        (a prompt fed in chunks ends with the budget of one forward, evicting chunk by chunk on the way)."""
        return budget is None or (in_prompt and self.ratio is not None)

    def protect(self, scores: torch.Tensor, positions: torch.Tensor, n_pad: torch.Tensor, length: int) -> torch.Tensor:
        """fp32 `scores` with pads at -inf (evicted first) and sinks / the `recent` last tokens at +inf (never evicted).

        `positions`: logical index of each slot (same shape as `scores`); `n_pad`: left pads per row, shaped to
        broadcast against `positions`; `length`: the logical length L."""
        rank = positions.long() - n_pad  # index among the row's real tokens; < 0: pad
        keep = (rank < self.sinks) | (positions >= length - self.recent)
        return scores.float().masked_fill(keep, float("inf")).masked_fill(rank < 0, float("-inf"))

    def resolve(self, prompt_length: int) -> tuple[int, int]:
        """`(budget, slack)` in tokens; a ratio is applied to `prompt_length` and floored at max(1, sinks + recent)."""
        budget = self.budget
        if budget is None:
            budget = max(math.ceil(self.ratio * prompt_length), self.sinks + self.recent, 1)
        slack = min(MAX_SLACK, budget // 32) if self.slack is None else self.slack
        return budget, slack


def make_policy(name: str, **params) -> EvictionPolicy:
    """Instantiate the policy registered as `name`; unknown names or parameters raise a ValueError listing the
    accepted ones."""
    if name not in POLICIES:
        raise ValueError(f"policy={name!r} is unknown; accepted values: {sorted(POLICIES)}")
    cls = POLICIES[name]
    accepted = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"policy {name!r} got unknown parameter(s) {unknown}; accepted: {accepted}")
    return cls(**params)
