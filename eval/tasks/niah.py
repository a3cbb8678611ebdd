"""RULER needle-in-a-haystack (arXiv 2404.06654): key -> value needles with distractor keys, ask one or more keys."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from . import register_task
from .base import Prompter, Sample, fit_context

INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards."
)
_ADJECTIVES = (
    "amber ancient brave bright calm clever crimson curious daring dusty eager fancy gentle golden hollow humble "
    "icy jolly lively lucky misty noble odd pale quiet rapid rustic silent silver steady swift tender vivid wild"
).split()
_NOUNS = (
    "anchor badger banner beacon canyon cedar comet copper falcon forest garden glacier harbor island lantern "
    "meadow mirror orchard otter pebble pepper planet river saddle shadow signal spruce summit thistle tiger willow"
).split()


@register_task("niah", "RULER needle in a haystack: `num_keys` keys (distractors), ask `num_queries`, 7-digit values")
@register_task("niah_single", "niah with one key and one value", num_keys=1)
@register_task("niah_multikey", "niah with 4 keys, ask one (3 distractor keys)", num_keys=4)
@register_task("niah_multivalue", "niah with 4 values for the asked key", num_values=4)
@register_task("niah_multiquery", "niah with 4 keys, ask 2", num_keys=4, num_queries=2)
class Niah:
    """Needles "One of the special magic numbers for {key} is: {value}." in real text (pydoc by default).

    The first needle of the first queried key sits at the requested depth; every other needle at a seeded random depth.
    The answer is the queried values, sorted and space-separated.
    """

    default_haystack = "pydoc"

    @dataclass
    class Params:
        num_keys: int = 1  # distinct keys with needles (queried + distractors)
        num_values: int = 1  # values per key
        num_queries: int = 1  # keys asked (<= num_keys)
        value_digits: int = 7

        def __post_init__(self):
            for name in ("num_keys", "num_values", "num_queries"):
                if getattr(self, name) < 1:
                    raise ValueError(f"{name}={getattr(self, name)!r} must be >= 1")
            if self.num_queries > self.num_keys:
                raise ValueError(f"num_queries={self.num_queries} must be <= num_keys={self.num_keys}")
            if not 3 <= self.value_digits <= 12:
                raise ValueError(f"value_digits={self.value_digits!r} must be in [3, 12]")

    def sample(
        self, params, prompter: Prompter, length: int, depth: float, haystack: str, rng: random.Random, index: int
    ):
        keys = [f"{a}-{n}" for a, n in rng.sample([(a, n) for a in _ADJECTIVES for n in _NOUNS], params.num_keys)]
        low = 10 ** (params.value_digits - 1)
        values = [str(v) for v in rng.sample(range(low, 10 * low), params.num_keys * params.num_values)]
        needles, queried = [], keys[: params.num_queries]
        for k, key in enumerate(keys):
            for v in range(params.num_values):
                at = depth if (k, v) == (0, 0) else rng.random()
                value = values[k * params.num_values + v]
                needles.append((at, f"One of the special magic numbers for {key} is: {value}."))
        answer = " ".join(sorted(values[: params.num_queries * params.num_values]))
        many = params.num_values * params.num_queries > 1
        query = ", ".join(queried)

        def frame(context: str):
            if many:
                return (
                    f"{INSTRUCTION}\n\n{context}\n\nWhat are all the special magic numbers for {query} mentioned "
                    "in the provided text?",
                    f"The special magic numbers for {query} mentioned in the provided text are",
                )
            return (
                f"{INSTRUCTION}\n\n{context}\n\nWhat is the special magic number for {query} mentioned in the "
                "provided text?",
                f"The special magic number for {query} mentioned in the provided text is",
            )

        prompt, context, meta = fit_context(prompter, length, needles, frame, haystack, rng)
        return Sample(index, prompt, answer, depth, context, needles[0][1], meta)

    def extract(self, generation: str, params) -> str:
        """The first `num_queries * num_values` distinct numbers of the generation, sorted."""
        found = list(dict.fromkeys(re.findall(r"\d+", generation)))[: params.num_queries * params.num_values]
        return " ".join(sorted(found))

    def max_new_tokens(self, params) -> int:
        return params.num_queries * params.num_values * (params.value_digits + 4)
