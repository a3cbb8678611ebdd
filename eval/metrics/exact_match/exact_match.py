"""Exact match for long-context retrieval tasks, as an offline `evaluate` module.

Load with `evaluate.load("<repo>/eval/metrics/exact_match")`; nothing is downloaded.
"""

import datasets
import evaluate

_DESCRIPTION = """Fraction of predictions equal to their reference after stripping whitespace and lowercasing.
Task modules extract the answer from the generation first (e.g. the first 5-digit number), so this is
RULER's exact match on the extracted answer."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of str, extracted answers.
    references: list of str, gold answers.
Returns:
    exact_match: float in [0, 1] (mean over examples).
Examples:
    >>> metric = evaluate.load("eval/metrics/exact_match")
    >>> metric.compute(predictions=["12345", "7"], references=["12345", "8"])
    {'exact_match': 0.5}
"""

_CITATION = """@article{hsieh2024ruler,
title={RULER: What's the Real Context Size of Your Long-Context Language Models?},
author={Hsieh, Cheng-Ping and others}, journal={arXiv preprint arXiv:2404.06654}, year={2024}}"""


def normalize(text: str) -> str:
    """Strip surrounding whitespace and lowercase."""
    return text.strip().lower()


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    """Exact match of extracted answers."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        if not predictions:
            return {"exact_match": 0.0}
        hits = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references))
        return {"exact_match": hits / len(predictions)}
