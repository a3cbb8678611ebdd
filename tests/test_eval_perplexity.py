"""`perplexity_through_cache`: exact for an uncompressed cache, and the prefix is the prompt for ratio budgets."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_llama
from transformers import DynamicCache

from eval.perplexity import perplexity_through_cache
from kvpress_lite import HeavyHitterCache


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_dynamic_cache_matches_one_full_forward(chunk_size):
    model = tiny_llama()
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits[:, 11:-1].float()
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 12:].flatten()).item()
    steps = []
    result = perplexity_through_cache(model, ids, DynamicCache(config=model.config), 12, chunk_size, steps.append)
    assert result["eval_tokens"] == 2 * 18
    # progress: one call per forward (the first token alone, then chunks), summing to the scored positions
    assert steps == [1] + [min(chunk_size, 17 - i) for i in range(0, 17, chunk_size)]
    assert result["nll"] == pytest.approx(expected, abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_ratio_budget_is_a_fraction_of_the_prefix_whatever_the_chunk_size():
    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    for chunk_size in (1, 4):
        with HeavyHitterCache(model, ratio=0.5, sinks=1, recent=2, slack=0) as cache:
            perplexity_through_cache(model, ids, cache, prefix_length=20, chunk_size=chunk_size)
            assert cache.layers[0].budget == 10 and cache.layers[0].physical_length <= 10 + chunk_size


def test_bad_arguments_raise():
    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 10))
    with pytest.raises(ValueError, match="prefix_length"):
        perplexity_through_cache(model, ids, DynamicCache(config=model.config), 10)
    with pytest.raises(ValueError, match="chunk_size"):
        perplexity_through_cache(model, ids, DynamicCache(config=model.config), 5, chunk_size=0)
