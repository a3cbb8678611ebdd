"""Random eviction: the floor every scoring policy must beat."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .policy import EvictionPolicy, ScoreInputs
from .registration import register_policy


@register_policy("random", "uniformly random eviction (baseline), seeded")
@dataclass
class RandomPolicy(EvictionPolicy):
    """Random eviction baseline (as in the H2O and KNorm papers' ablations, e.g. https://arxiv.org/abs/2306.14048).

    Score = i.i.d. uniform draws at each eviction, from a generator seeded with `seed` (reproducible runs).

    Args:
        seed: seed of the policy's own `torch.Generator` (global RNG untouched, so sampling is unaffected).
    """

    seed: int = 0
    _generators: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    per_head = False  # no ranking to compare across kv heads: per-head budgets (adaptive=True) do not apply

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """`[batch, kv_heads, seq]` uniform random scores."""
        device = inputs.keys.device
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return torch.rand(inputs.positions.shape, generator=self._generators[device], device=device)
