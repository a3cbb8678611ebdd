"""The exact-match scorer: the local `evaluate` module, offline, with evaluate's output schema."""

from __future__ import annotations

import pytest

from eval.scoring import METRIC_PATH, SCORER, _plain, exact_match


def test_exact_match_values_and_normalisation():
    assert exact_match(["12345", " 7 ", "Abc"], ["12345", "8", "abc"]) == {"exact_match": pytest.approx(2 / 3)}
    assert exact_match([], []) == {"exact_match": 0.0}
    assert exact_match(["1"], ["1"]) == {"exact_match": 1.0}


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        exact_match(["1", "2"], ["1"])


def test_loads_offline_as_a_local_evaluate_module(monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    metric = evaluate.load(str(METRIC_PATH))
    assert metric.name == "exact_match"
    assert metric.compute(predictions=["a", "b"], references=["a", "c"]) == {"exact_match": 0.5}


def test_plain_python_fallback_agrees_with_the_evaluate_module():
    assert SCORER.startswith("evaluate:")  # evaluate is installed here: the module is what runs
    predictions, references = ["12345", " 7 ", "Abc", "x"], ["12345", "8", "abc", "y"]
    assert _plain(predictions, references) == exact_match(predictions, references) == {"exact_match": 0.5}
