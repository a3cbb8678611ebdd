"""What every task shares: the prompt renderer (base or chat) and fitting a haystack with needles to a token length."""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from .haystack import filler_words, is_sentence_end


@dataclass
class Sample:
    """One generated example.

    `depth` is the requested depth of the queried needle (0 = haystack start, 1 = end); `meta` holds what was
    measured: `prompt_tokens`, `haystack_tokens`, `needle_depths` (tokens before each needle / haystack tokens).
    """

    index: int
    prompt: str
    answer: str
    depth: float
    context: str
    needle: str
    meta: dict = field(default_factory=dict)


class Prompter:
    """Renders `user` text plus an answer prefix as a plain completion prompt, or through the chat template."""

    def __init__(self, tokenizer, chat: bool = False):
        if chat and not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat=True but the tokenizer has no chat template; use chat: false for base models")
        self.tokenizer, self.chat = tokenizer, chat

    def render(self, user: str, answer_prefix: str) -> str:
        """The text fed to the model; generation continues right after `answer_prefix`."""
        if self.chat:
            messages = [{"role": "user", "content": user}]
            head = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return head + answer_prefix
        return f"{user}\n{answer_prefix}"

    def encode(self, text: str) -> list[int]:
        """Token ids as the model receives them (special tokens for plain prompts; chat templates add their own)."""
        return self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"]

    def count(self, text: str) -> int:
        return len(self.encode(text))


def _word_token_bounds(tokenizer, words: list[str]) -> list[int]:
    """bounds[i] = tokens of `" ".join(words)` before word i (len(words) + 1 entries)."""
    enc = tokenizer(" ".join(words), add_special_tokens=False, return_offsets_mapping=True)
    starts = [start for start, _ in enc["offset_mapping"]]
    bounds, char = [0], 0
    for word in words[:-1]:
        char += len(word) + 1
        bounds.append(bisect.bisect_left(starts, char - 1))  # the space before a word belongs to its token
    bounds.append(len(starts))
    return bounds


def _spot(ends: list[int], bounds: list[int], n: int, depth: float) -> int:
    """Word index for a needle at `depth`: nearest sentence end (`ends`) within 2% of the haystack, else nearest
    word."""
    target = depth * bounds[n]
    best = min(ends, key=lambda j: abs(bounds[j] - target))
    if abs(bounds[best] - target) <= 0.02 * bounds[n]:
        return best
    j = bisect.bisect_left(bounds, target, 0, n + 1)
    return min((max(j - 1, 0), min(j, n)), key=lambda k: abs(bounds[k] - target))


def fit_context(
    prompter: Prompter,
    length: int,
    needles: list[tuple[float, str]],
    frame: Callable[[str], tuple[str, str]],
    haystack: str,
    rng: random.Random,
) -> tuple[str, str, dict]:
    """Fill a haystack so the rendered prompt has `length` tokens (never more), needles at their depths.

    Args:
        needles: `(depth, text)` pairs; needles at the same spot keep their listed order.
        frame: context -> `(user, answer_prefix)` for `Prompter.render`.
    Returns:
        `(prompt, context, meta)` with meta `prompt_tokens`, `haystack_tokens`, `needle_depths`.
    """
    overhead = prompter.count(prompter.render(*frame(" ".join(text for _, text in needles))))
    budget = length - overhead
    if budget < 16:
        raise ValueError(
            f"length={length} leaves {budget} haystack tokens after the instructions and needles "
            f"({overhead} tokens); use a longer length"
        )
    chars = budget * 8
    while True:
        words = filler_words(haystack, chars, rng)
        bounds = _word_token_bounds(prompter.tokenizer, words)
        if bounds[-1] >= budget:
            break
        chars *= 2
    for _ in range(8):
        n = bisect.bisect_right(bounds, budget) - 1
        ends = [j for j in range(n + 1) if j in (0, n) or is_sentence_end(words[j - 1])]
        spots = [_spot(ends, bounds, n, depth) for depth, _ in needles]
        order = sorted(range(len(needles)), key=lambda i: (spots[i], i))
        pieces, done = [], 0
        for i in order:
            pieces += words[done : spots[i]] + [needles[i][1]]
            done = spots[i]
        context = " ".join(pieces + words[done:n])
        prompt = prompter.render(*frame(context))
        tokens = prompter.count(prompt)
        if tokens <= length:
            break
        budget -= tokens - length
    depths = [bounds[j] / bounds[n] for j in spots]
    meta = {"prompt_tokens": tokens, "haystack_tokens": bounds[n], "needle_depths": depths}
    return prompt, context, meta
