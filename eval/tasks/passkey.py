"""Passkey retrieval (Mohtashami & Jaggi 2023, arXiv 2305.16300; RULER arXiv 2404.06654): one number in noise."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from . import register_task
from .base import Prompter, Sample, fit_context

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)


@register_task("passkey", "one pass key hidden in a haystack (noise by default)")
class Passkey:
    """A `digits`-digit pass key stated once at the requested depth; the answer is the key."""

    default_haystack = "noise"

    @dataclass
    class Params:
        digits: int = 5  # digits of the pass key

        def __post_init__(self):
            if not 1 <= self.digits <= 12:
                raise ValueError(f"digits={self.digits!r} must be in [1, 12]")

    def sample(
        self, params, prompter: Prompter, length: int, depth: float, haystack: str, rng: random.Random, index: int
    ):
        key = str(rng.randint(10 ** (params.digits - 1), 10**params.digits - 1))
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."

        def frame(context: str):
            return f"{INSTRUCTION}\n\n{context}\n\nWhat is the pass key?", "The pass key is"

        prompt, context, meta = fit_context(prompter, length, [(depth, needle)], frame, haystack, rng)
        return Sample(index, prompt, key, depth, context, needle, meta)

    def extract(self, generation: str, params) -> str:
        """The first number in the generation."""
        found = re.search(r"\d+", generation)
        return found.group(0) if found else ""

    def max_new_tokens(self, params) -> int:
        return params.digits + 4  # a leading space, one token per digit at worst, punctuation
