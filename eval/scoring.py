"""Exact-match scoring through the local `evaluate` module in eval/metrics/exact_match (offline)."""

from __future__ import annotations

import functools
from pathlib import Path

METRIC_PATH = Path(__file__).parent / "metrics" / "exact_match"


@functools.lru_cache(maxsize=1)
def exact_match_metric():
    """`evaluate.load` of the local exact-match module; reads no network."""
    import evaluate

    return evaluate.load(str(METRIC_PATH))


def exact_match(predictions: list[str], references: list[str]) -> dict:
    """`{"exact_match": float}` (evaluate's schema): fraction of predictions equal to references (stripped, lowercased)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return exact_match_metric().compute(predictions=predictions, references=references)
