"""Exact-match scoring through the local `evaluate` module in eval/metrics/exact_match (offline).

Where the `evaluate` package is missing (it is a declared dependency, but e.g. a bare GPU image may lack it), the
same computation runs in plain Python with the same output schema; `SCORER` says which one ran.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

METRIC_PATH = Path(__file__).parent / "metrics" / "exact_match"
SCORER = "evaluate:eval/metrics/exact_match" if importlib.util.find_spec("evaluate") else "python:exact_match"


@functools.lru_cache(maxsize=1)
def exact_match_metric():
    """`evaluate.load` of the local exact-match module; reads no network."""
    import evaluate

    return evaluate.load(str(METRIC_PATH))


def _plain(predictions: list[str], references: list[str]) -> dict:
    hits = sum(p.strip().lower() == r.strip().lower() for p, r in zip(predictions, references))
    return {"exact_match": hits / len(predictions) if predictions else 0.0}


def exact_match(predictions: list[str], references: list[str]) -> dict:
    """`{"exact_match": float}` (evaluate's schema): fraction of predictions equal to references (stripped,
    lowercased)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if SCORER.startswith("python"):
        return _plain(predictions, references)
    return exact_match_metric().compute(predictions=predictions, references=references)
