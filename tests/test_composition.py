"""Composition (eviction + quantized storage, `bits=`) and the library base Cache: every strategy builds and generates
with every supported `bits`, composed caches free the bytes they promise, and a cache refuses a model, an empty
prompt or a reuse it was not built for with a clear error."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gemma3, tiny_llama
from generation_checks import assert_beams_match_teacher_forcing

from kvpress_lite import STRATEGIES, EvictionCache, QuantizedKVCache, build_cache, cache_kwarg, cache_nbytes
from kvpress_lite.quant.static_storage import StaticQuantizedKV
from kvpress_lite.storage import QuantizedKV

# (strategy, bits) for every kvpress_lite strategy that stores its KV quantized; tiny models have head_dim 16.
# fixed_slot stores bits 8/4 in its own preallocated slots (no residual_length, no int2): tests/test_fixed_slot.py
COMPOSABLE = sorted(n for n, s in STRATEGIES.items() if "bits" in s.params and s.family != "baseline"
                    and n != "fixed_slot")
TINY = {"group_size": 8, "residual_length": 4}
BUDGET = {"eviction": {"ratio": 0.5}}
STATIC = {"quantized_static": {"max_cache_len": 64}}  # preallocating caches need their length


def _generate(model, cache, ids, **kwargs):
    kwargs.setdefault("attention_mask", torch.ones_like(ids))
    out = model.generate(ids, pad_token_id=0, **{cache_kwarg(model): cache}, **kwargs)
    if hasattr(cache, "detach"):
        cache.detach()
    return out


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("name", COMPOSABLE)
def test_every_strategy_stores_quantized_with_every_bits(name, bits):
    model = tiny_llama()
    cache = build_cache(name, model, bits=bits, **TINY, **BUDGET.get(STRATEGIES[name].family, {}),
                        **STATIC.get(name, {}))
    ids = torch.randint(1, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    out = _generate(model, cache, ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (2, 45)
    stores = [layer.store for layer in cache.layers]
    kinds = (QuantizedKV, StaticQuantizedKV)
    assert all(isinstance(s, kinds) and s.bits == bits and s.quantized_length > 0 for s in stores)


@pytest.mark.parametrize("policy", ["snapkv", "tova", "h2o"])
def test_composed_cache_generates_with_padding_beam_search_and_continuation(policy):
    model = tiny_gemma3()
    cache = EvictionCache(model, policy=policy, budget=16, recent=4, bits=4, **TINY)
    ids = torch.randint(1, 128, (2, 30), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # row 1 is left-padded
    with cache:
        key = cache_kwarg(model)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                             **{key: cache})
        full = cache.layers[3]  # the full-attention layer evicts and quantizes
        assert full.physical_length <= 16 + full.slack and full.store.quantized_length > 0
        assert full.n_pad.tolist() == [0, 7]
        more = model.generate(out, attention_mask=torch.cat([mask, torch.ones(2, 6, dtype=mask.dtype)], 1),
                              max_new_tokens=4, do_sample=False, pad_token_id=0, **{key: cache})
        assert torch.equal(more[:, :36], out) and cache.get_seq_length() == 39
    # beam search really reorders the evicted int4 storage: every beam scores as its tokens teacher-forced
    beams = assert_beams_match_teacher_forcing(
        model, lambda: EvictionCache(model, policy=policy, budget=16, recent=4, bits=4, **TINY), ids, mask)
    assert beams.shape == (6, 36)


def test_bits_none_stores_full_precision_like_before():
    model = tiny_llama()
    cache = EvictionCache(model, policy="tova", budget=16, recent=4)
    _generate(model, cache, torch.randint(1, 128, (1, 30)), max_new_tokens=3, do_sample=False)
    assert all(type(layer.store).__name__ == "FullPrecisionKV" for layer in cache.layers)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 3}, r"bits=3 is not supported; accepted values: \[2, 4, 8\]"),
        ({"bits": 4, "group_size": 12}, r"group_size=12 must divide head_dim=16.*accepted values: \[1, 2, 4, 8, 16\]"),
        ({"bits": 4, "key_mode": "row"}, r"key_mode='row'.*accepted values: \['channel', 'token'\]"),
        ({"bits": 4, "residual_length": -2}, "residual_length=-2"),
    ],
)
def test_bad_storage_parameters_raise_before_anything_runs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EvictionCache(tiny_llama(), policy="tova", budget=16, recent=4, **kwargs)


# ---------------------------------------------------------------- the base Cache: model checks, empty input, reuse
def test_cache_for_a_smaller_model_refuses_a_larger_one():
    cache = QuantizedKVCache(tiny_llama(), bits=4, **TINY)  # 2 layers
    with pytest.raises(ValueError, match=r"built for model_type='llama', 2 layers.*has at least 3 layers"):
        _generate(tiny_gemma3(), cache, torch.randint(1, 128, (1, 12)), max_new_tokens=2)


def test_cache_for_a_larger_model_refuses_a_smaller_one_at_its_next_forward():
    cache = QuantizedKVCache(tiny_gemma3(), bits=4, **TINY)  # 4 layers
    with pytest.raises(ValueError, match=r"built for model_type='gemma3_text', 4 layers.*has 2 layers"):
        _generate(tiny_llama(), cache, torch.randint(1, 128, (1, 12)), max_new_tokens=2)


def test_cache_refuses_other_kv_geometry():
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4)).eval()
    cache = QuantizedKVCache(tiny_llama(), bits=4, **TINY)
    with pytest.raises(ValueError, match=r"2 KV heads, head_dim=16.*keys of shape \(1, 4, 12, 16\)"):
        _generate(other, cache, torch.randint(1, 128, (1, 12)), max_new_tokens=2)


@pytest.mark.parametrize("make_cache", [
    lambda m: QuantizedKVCache(m, bits=4, **TINY),
    lambda m: EvictionCache(m, policy="snapkv", budget=16, recent=4, bits=4, **TINY),
], ids=["quantized", "snapkv-int4"])
def test_empty_prompt_and_reuse_without_reset_raise_and_reset_recovers(make_cache):
    model = tiny_llama()
    cache = make_cache(model)
    key = cache_kwarg(model)
    ids = torch.randint(1, 128, (1, 20), generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="the model got 0 new tokens.*prompt is empty"):
        model.generate(ids[:, :0], attention_mask=ids[:, :0], max_new_tokens=2, pad_token_id=0, **{key: cache})
    cache.reset()
    first = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                           pad_token_id=0, **{key: cache})
    with pytest.raises(ValueError, match=r"already holds 23 tokens.*call `cache.reset\(\)`"):
        model.generate(ids[:, :10], attention_mask=torch.ones_like(ids[:, :10]), max_new_tokens=4, pad_token_id=0,
                       **{key: cache})
    cache.reset()
    again = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                           pad_token_id=0, **{key: cache})
    assert torch.equal(again, first)
    if hasattr(cache, "detach"):
        cache.detach()


def test_reset_empties_sliding_layers_too_on_every_transformers_version():
    """transformers 5.17 zeroes (not drops) a DynamicLayer on reset: a reused hybrid cache must still start empty."""
    model = tiny_gemma3()
    cache = QuantizedKVCache(model, bits=4, **TINY)
    ids = torch.randint(1, 128, (1, 30), generator=torch.Generator().manual_seed(3))
    first = _generate(model, cache, ids, max_new_tokens=4, do_sample=False)
    cache.reset()
    assert cache.get_seq_length() == 0 and all(layer.get_seq_length() == 0 for layer in cache.layers)
    assert torch.equal(_generate(model, cache, ids, max_new_tokens=4, do_sample=False), first)


def test_every_family_accepts_the_model_and_config_where_no_model_is_needed():
    model = tiny_llama()
    assert QuantizedKVCache(model, bits=4, **TINY).geometry == QuantizedKVCache(model.config, bits=4, **TINY).geometry
    with pytest.raises(ValueError, match="must be a transformers PreTrainedModel"):
        EvictionCache(model.config, policy="tova", budget=16, recent=4)


# ---------------------------------------------------------------- real models
@pytest.mark.model
def test_smollm2_cache_refuses_gemma3(smollm2, gemma3):
    (small, _), (gemma, tokenizer) = smollm2, gemma3
    cache = QuantizedKVCache(small, bits=4)
    ids = tokenizer("The cache knows its model.", return_tensors="pt").input_ids
    with pytest.raises(ValueError, match=r"built for model_type='llama', 30 layers, 3 KV heads, head_dim=64.*keys of "
                                         r"shape \(1, 1, \d+, 256\)"):
        _generate(gemma, cache, ids, max_new_tokens=2)


@pytest.mark.model
def test_smollm2_int4_eviction_stores_at_least_2_5x_fewer_bytes(smollm2):
    """Budget 256 after a 700-token prompt and 40 new tokens: the int4 composed cache holds >= 2.5x fewer bytes than
    the same policy in bf16, metadata (positions, scores) included. (At a 128-token budget the 8-15 full-precision
    window tokens weigh more: 2.48-2.67x, see docs/composition.md.)"""
    import pydoc_data.topics

    model, tokenizer = smollm2
    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:20])
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :700]
    sizes = {}
    for bits in (None, 4):
        cache = EvictionCache(model, policy="tova", budget=256, bits=bits)
        _generate(model, cache, ids, max_new_tokens=40, min_new_tokens=40, do_sample=False)
        assert cache.get_seq_length() == 739 and cache.layers[0].physical_length <= 256 + cache.layers[0].slack
        sizes[bits] = cache_nbytes(cache)
    assert sizes[None] / sizes[4] >= 2.5
