"""The registry is the single source of strategies: every one builds, is documented, and appears in README."""

from __future__ import annotations

import pathlib

import pytest
from conftest import tiny_llama

import kvpress_lite
from kvpress_lite import STRATEGIES, build_cache, cache_nbytes
from kvpress_lite.registry import FAMILIES

README = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
# Params a strategy needs to build on the tiny model (eviction needs a budget; the rest has defaults).
REQUIRED = {"eviction": {"budget": 24}, "quantization": {"group_size": 16}, "baseline": {}}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_builds_documents_itself_and_is_in_readme(name):
    strategy = STRATEGIES[name]
    assert strategy.family in FAMILIES and strategy.summary
    assert f"`{name}`" in README, f"strategy {name!r} missing from README's strategy table"
    model = tiny_llama()
    params = REQUIRED[strategy.family] if name != "hf-quantized" else {"group_size": 16}
    cache = build_cache(name, model, **params)
    out = model.generate(
        __import__("torch").randint(0, 128, (1, 40)), max_new_tokens=3, do_sample=False, past_key_values=cache
    )
    assert out.shape == (1, 43) and cache_nbytes(cache) > 0
    if hasattr(cache, "detach"):
        cache.detach()


def test_families_cover_the_mission():
    assert {s.family for s in STRATEGIES.values()} >= {"baseline", "quantization", "eviction"}


def test_unknown_strategy_lists_registered_names():
    with pytest.raises(ValueError, match=r"unknown strategy 'nope'; registered strategies: \["):
        build_cache("nope", tiny_llama())


@pytest.mark.parametrize("name", kvpress_lite.__all__)
def test_public_api_is_documented(name):
    obj = getattr(kvpress_lite, name)
    if callable(obj):
        assert obj.__doc__ and obj.__doc__.strip(), f"{name} has no docstring"
