"""Haystack filler: real text (pydoc, a local file, a `datasets` source) or RULER's noise sentences, as words."""

from __future__ import annotations

import functools
import random

# RULER's noise haystack (arXiv 2404.06654, passkey / variable tracking).
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@functools.lru_cache(maxsize=4)
def _text(source: str) -> str:
    from ..text_sources import load_text

    return " ".join(load_text(source).split())  # one paragraph: whitespace normalised


def filler_words(source: str, n_chars: int, rng: random.Random) -> list[str]:
    """About `n_chars` characters of filler as a word list; real text starts at a seeded sentence start."""
    if source == "noise":
        return (" ".join([NOISE] * (n_chars // len(NOISE) + 1))).split()
    text = _text(source)
    if len(text) < 1000:
        raise ValueError(f"haystack source {source!r} has only {len(text)} characters; need a long text")
    text = text * (n_chars // len(text) + 2)  # wrap around for contexts longer than the source
    start = rng.randrange(len(text) - n_chars - 1)
    sentence = text.find(". ", start)
    start = sentence + 2 if 0 <= sentence < start + 2000 else start
    return text[start : start + n_chars].split()[:-1]  # drop a possibly cut last word


def is_sentence_end(word: str) -> bool:
    """True when a needle may follow `word` without splitting a sentence."""
    return word.endswith((".", "!", "?", ":", ";"))
