"""The run plan: one run per (cell, cache), a cell being the perplexity setting or a task at one length.

A run's folder is named from its config: `<output_dir>/<recipe>/<model>/<cell>/<label>-<hash8>`, where the hash
covers everything that determines the result, so changing any setting starts a fresh run and resume is safe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .config import CacheSpec, Recipe


@dataclass(frozen=True)
class Run:
    """One (cell, cache) pair of a recipe."""

    recipe: Recipe
    kind: str  # "perplexity" | "task"
    key: str  # "perplexity" or the task key
    length: int | None  # task prompt tokens; None for perplexity
    cache: CacheSpec

    @property
    def part(self):
        """The PerplexityConfig or TaskSpec of this run."""
        return self.recipe.perplexity if self.kind == "perplexity" else self.recipe.tasks[self.key]

    @property
    def model(self) -> str:
        return self.part.model or self.recipe.model

    @property
    def dtype(self) -> str:
        return self.part.dtype or self.recipe.dtype

    @property
    def cell(self) -> str:
        if self.kind == "perplexity":
            return f"ppl-{self.part.prefix_length}+{self.part.eval_length}"
        return f"{self.key}-{self.length}"

    def config(self) -> dict:
        """Everything that determines this run's result (written to config.yaml, hashed into the folder name)."""
        r = self.recipe
        part = dataclasses.asdict(self.part)
        part.pop("caches")  # the rest of the sweep does not change this run
        part.update(model=self.model, dtype=self.dtype)
        if self.kind == "task":
            part.pop("lengths")
            part["length"] = self.length
        return {
            "recipe": r.name,
            "kind": self.kind,
            "cell": self.cell,
            "device": r.device,
            "attn_implementation": r.attn_implementation,
            "num_threads": r.num_threads,
            "seed": r.seed,
            "chat": r.chat,
            self.kind: part,
            "cache": dataclasses.asdict(self.cache),
        }

    @property
    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.config(), sort_keys=True, default=str).encode()).hexdigest()[:8]

    def path(self, output_dir: str | Path) -> Path:
        model = self.model.replace("/", "--").strip(".-") or "model"
        return Path(output_dir) / self.recipe.name / model / self.cell / f"{self.cache.label}-{self.config_hash}"

    def baseline(self) -> Run:
        """The DynamicCache run of the same cell (ratios and perplexity deltas are measured against it)."""
        spec = next(c for c in caches_of(self.recipe, self.part) if c.is_baseline)
        return dataclasses.replace(self, cache=spec)


def caches_of(recipe: Recipe, part) -> list[CacheSpec]:
    """The sweep of one part: its own `caches`, else the recipe's."""
    return part.caches if part.caches is not None else recipe.caches


def plan(recipe: Recipe) -> list[Run]:
    """Every run of a recipe, grouped by (model, dtype) so each model loads once, baseline first in each cell."""
    cells = []
    if recipe.perplexity is not None:
        cells.append(("perplexity", "perplexity", None, recipe.perplexity))
    for key, spec in recipe.tasks.items():
        cells += [("task", key, length, spec) for length in spec.lengths]
    runs = [Run(recipe, kind, key, length, cache)
            for kind, key, length, part in cells for cache in caches_of(recipe, part)]
    order = list(dict.fromkeys((r.model, r.dtype) for r in runs))
    return sorted(runs, key=lambda r: order.index((r.model, r.dtype)))  # stable: cell order and baseline-first kept
