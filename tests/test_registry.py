"""The registry is the single source of strategies: every one builds, is documented, appears in README, and decodes
exactly like DynamicCache (greedy, beam search, seeded sampling) when its parameters compress nothing."""

from __future__ import annotations

import pathlib

import pytest
import torch
from conftest import tiny_gemma3, tiny_llama
from transformers import Cache, DynamicCache

import kvpress_lite
from kvpress_lite import STRATEGIES, build_cache, cache_kwarg, cache_nbytes
from kvpress_lite.registry import FAMILIES

README = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
# Params a strategy needs to build on the tiny model (eviction needs a budget; the rest has defaults).
REQUIRED = {"eviction": {"budget": 24}, "quantization": {"group_size": 16}, "cross-layer": {"start": 0}, "baseline": {}}
# Params under which a strategy keeps every token in full precision (prompts + new tokens < 100 here).
LOSSLESS = {"eviction": {"budget": 1000}, "quantization": {"group_size": 16, "residual_length": 1000},
            "cross-layer": {"start": 0, "window": 1000}, "baseline": {}}  # cross-layer merges tokens leaving the window
# Static caches preallocate: they also need the number of tokens (prompts + new tokens < 100 here).
STATIC = {"quantized_static": {"max_cache_len": 128}}
# transformers' QuantizedCache quantizes its first prefill whatever the window: never lossless.
NOT_LOSSLESS = {"hf-quantized"}


def _generate(model, cache, ids, **kwargs):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, **{cache_kwarg(model): cache},
                         **kwargs)
    if hasattr(cache, "detach"):
        cache.detach()
    return out


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_builds_documents_itself_and_is_in_readme(name):
    strategy = STRATEGIES[name]
    assert strategy.family in FAMILIES and strategy.summary
    assert f"`{name}`" in README, f"strategy {name!r} missing from README's strategy table"
    model = tiny_llama()
    params = REQUIRED[strategy.family] if name != "hf-quantized" else {"group_size": 16}
    params = {**params, **STATIC.get(name, {})}
    cache = build_cache(name, model, **params)
    assert isinstance(cache, Cache)
    with pytest.raises(ValueError, match=rf"strategy {name!r} got unknown parameter\(s\) \['nope'\]; accepted: "):
        build_cache(name, model, nope=1, **params)
    out = _generate(model, cache, torch.randint(0, 128, (1, 40)), max_new_tokens=3, do_sample=False)
    # the cache holds the logical length (prompt + new tokens but the last), whatever it evicted or merged
    assert out.shape == (1, 43) and cache.get_seq_length() == 42 and cache_nbytes(cache) > 0


LOSSLESS_NAMES = sorted(n for n in STRATEGIES if n not in NOT_LOSSLESS and n != "dynamic")


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
@pytest.mark.parametrize("name", LOSSLESS_NAMES)
def test_beam_search_and_seeded_sampling_match_dynamic_when_nothing_is_compressed(name, make_model):
    """Beam search reorders the cache every step (scores and metadata too); sampling draws from the logits: both
    give DynamicCache's tokens exactly when the strategy keeps everything in full precision."""
    model = make_model()
    ids = torch.randint(1, 128, (2, 30), generator=torch.Generator().manual_seed(0))
    params = {**LOSSLESS[STRATEGIES[name].family], **STATIC.get(name, {})}
    beam = dict(max_new_tokens=8, num_beams=3, do_sample=False, num_return_sequences=2)
    expected = _generate(model, DynamicCache(config=model.config), ids, **beam)
    got = _generate(model, build_cache(name, model, **params), ids, **beam)
    assert torch.equal(got, expected)
    sample = dict(max_new_tokens=12, do_sample=True, top_k=0, temperature=1.5)
    torch.manual_seed(7)
    expected = _generate(model, DynamicCache(config=model.config), ids, **sample)
    torch.manual_seed(7)
    got = _generate(model, build_cache(name, model, **params), ids, **sample)
    assert torch.equal(got, expected)
    assert len(set(map(tuple, expected[:, 30:].tolist()))) == 2  # the rows really sampled different tokens


def test_families_cover_the_mission():
    assert {s.family for s in STRATEGIES.values()} >= {"baseline", "quantization", "eviction"}


def test_unknown_strategy_lists_registered_names():
    with pytest.raises(ValueError, match=r"unknown strategy 'nope'; registered strategies: \["):
        build_cache("nope", tiny_llama())


@pytest.mark.parametrize("name", kvpress_lite.__all__)
def test_public_api_is_documented(name):
    obj = getattr(kvpress_lite, name)
    if isinstance(obj, dict):  # registries: non-empty, every entry describes itself
        assert obj, f"{name} is empty"
        for key, entry in obj.items():
            text = getattr(entry, "summary", None) or getattr(entry, "description", None)
            assert text and text.strip(), f"{name}[{key!r}] has no summary/description"
    else:
        assert callable(obj), f"{name} is neither callable nor a registry"
        assert obj.__doc__ and obj.__doc__.strip(), f"{name} has no docstring"


def test_a_taken_name_is_refused_and_the_registered_entry_kept():
    """Registering a policy (or any strategy) under a taken name raises, naming the registered ones, and changes
    neither `POLICIES` nor `STRATEGIES`: the registries are what user code extends (docs/extending.md)."""
    from dataclasses import dataclass

    from kvpress_lite import register
    from kvpress_lite.eviction import POLICIES, EvictionPolicy, register_policy

    before = dict(POLICIES), dict(STRATEGIES)
    with pytest.raises(ValueError, match=r"strategy 'tova' is already registered; registered strategies: \[.*'tova'"):
        @register_policy("tova", "a clash")
        @dataclass
        class Clash(EvictionPolicy):
            pass
    with pytest.raises(ValueError, match="strategy 'dynamic' is already registered"):
        register("dynamic", "baseline", "a clash")(lambda model: None)
    assert (dict(POLICIES), dict(STRATEGIES)) == before and POLICIES["tova"].name == "tova"
    with pytest.raises(ValueError, match="family='nope' is not one of"):
        register("new", "nope", "x")
