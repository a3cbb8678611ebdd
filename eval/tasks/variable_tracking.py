"""RULER variable tracking (arXiv 2404.06654): follow a chain of assignments VAR X = 12345, VAR Y = VAR X, ..."""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass

from . import register_task
from .base import Prompter, Sample, fit_context


@register_task("variable_tracking", "RULER variable tracking: find every variable bound to a value through a chain")
class VariableTracking:
    """`num_chains` chains of `num_hops` re-assignments; the queried chain starts at the requested depth and its
    statements follow in order toward the end, the others at seeded random depths. Answer: the chain's variables.
    """

    default_haystack = "noise"

    @dataclass
    class Params:
        num_chains: int = 1  # chains (one queried, the rest distractors)
        num_hops: int = 4  # re-assignments per chain: num_hops + 1 variables hold the value
        value_digits: int = 5

        def __post_init__(self):
            if self.num_chains < 1 or self.num_hops < 1:
                raise ValueError(f"num_chains={self.num_chains}, num_hops={self.num_hops} must be >= 1")
            if not 3 <= self.value_digits <= 12:
                raise ValueError(f"value_digits={self.value_digits!r} must be in [3, 12]")

    def sample(
        self, params, prompter: Prompter, length: int, depth: float, haystack: str, rng: random.Random, index: int
    ):
        n_vars = params.num_chains * (params.num_hops + 1)
        names = set()
        while len(names) < n_vars:
            names.add("".join(rng.choices(string.ascii_uppercase, k=5)))
        names = sorted(names)
        rng.shuffle(names)
        low = 10 ** (params.value_digits - 1)
        values = [str(v) for v in rng.sample(range(low, 10 * low), params.num_chains)]
        needles = []
        for c in range(params.num_chains):
            chain = names[c * (params.num_hops + 1) : (c + 1) * (params.num_hops + 1)]
            start = depth if c == 0 else rng.random()
            depths = [start + (1 - start) * h / (params.num_hops + 1) for h in range(params.num_hops + 1)]
            needles.append((depths[0], f"VAR {chain[0]} = {values[c]}."))
            needles += [(d, f"VAR {chain[h + 1]} = VAR {chain[h]}.") for h, d in enumerate(depths[1:])]
        queried = names[: params.num_hops + 1]
        answer = " ".join(sorted(queried))
        count = params.num_hops + 1

        def frame(context: str):
            return (
                "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                f"{context}\n\nQuestion: Find all variables that are assigned the value {values[0]} in the text above.",
                f"Answer: According to the chain(s) of variable assignment in the text above, {count} variables are "
                f"assigned the value {values[0]}, they are:",
            )

        prompt, context, meta = fit_context(prompter, length, needles, frame, haystack, rng)
        return Sample(index, prompt, answer, depth, context, needles[0][1], meta)

    def extract(self, generation: str, params) -> str:
        """The first `num_hops + 1` distinct 5-letter upper-case names of the generation, sorted."""
        found = list(dict.fromkeys(re.findall(r"\b[A-Z]{5}\b", generation)))[: params.num_hops + 1]
        return " ".join(sorted(found))

    def max_new_tokens(self, params) -> int:
        return 7 * (params.num_hops + 1)
