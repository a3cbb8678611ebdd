"""Per-head budgets (`EvictionCache(..., adaptive=True)`, AdaKV): exactness against DynamicCache, the allocation
against a reference top-k over the flattened heads, resident bytes of the flat slot pool, beam/batch state, errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import padded_batch, tiny_gemma3, tiny_llama
from transformers import DynamicCache

from kvpress_lite import EvictionCache, build_cache, cache_nbytes
from kvpress_lite._compat import attention_implementation, cache_kwarg
from kvpress_lite.eviction import AdaptiveEvictionLayer

TINY = {"llama": tiny_llama, "gemma3": tiny_gemma3}
PER_HEAD_POLICIES = ["snapkv", "h2o", "knorm", "expected_attention"]


def generate(model, cache, ids, mask, **kwargs):
    kwargs = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "return_dict_in_generate": True,
              "output_logits": True, "pad_token_id": 0, **kwargs}
    return model.generate(input_ids=ids, attention_mask=mask, **{cache_kwarg(model): cache}, **kwargs)


def adaptive_layers(cache) -> list[AdaptiveEvictionLayer]:
    return [layer for layer in cache.layers if isinstance(layer, AdaptiveEvictionLayer)]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_budget_at_least_the_prompt_equals_dynamic_cache(arch, impl):
    """fp32, batch 2 with a left-padded row: the masked per-head path computes exactly what DynamicCache computes."""
    model = TINY[arch](impl)
    ids, mask = padded_batch()
    ref = generate(model, DynamicCache(config=model.config), ids, mask)
    for policy in PER_HEAD_POLICIES:
        with EvictionCache(model, policy=policy, budget=ids.shape[1] + 6, sinks=1, recent=2,
                           adaptive=True) as cache:
            out = generate(model, cache, ids, mask)
        diff = max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits, strict=True))
        assert diff <= 1e-6, (policy, diff)
        assert torch.equal(out.sequences, ref.sequences), policy
        assert all(layer.physical_length == 2 * (ids.shape[1] + 5) for layer in adaptive_layers(cache))
    assert attention_implementation(model) == impl


def test_kept_slots_are_the_top_scored_over_flattened_heads_with_a_floor():
    """knorm scores need no attention, so the reference is computed from DynamicCache's keys: per row, each head's
    `ceil(floor x budget)` best slots, then the best of all heads' remaining slots, `budget x H_kv` in all."""
    model = tiny_llama(num_key_value_heads=2)
    ids, mask = padded_batch(length=16, pad=5)
    dyn = DynamicCache(config=model.config)
    model(input_ids=ids, attention_mask=mask, **{cache_kwarg(model): dyn})
    budget, floor = 5, 0.4
    with EvictionCache(model, policy="knorm", budget=budget, sinks=0, recent=0, slack=0, adaptive=True,
                       head_floor=floor) as cache:
        model(input_ids=ids, attention_mask=mask, **{cache_kwarg(model): cache})
    for layer_idx, layer in enumerate(cache.layers):
        keys = dyn.layers[layer_idx].keys  # (B, H, L, D)
        scores = -keys.float().norm(dim=-1)
        scores[1, :, :5] = float("-inf")  # row 1's pads
        for row in range(2):
            per_head = math.ceil(floor * budget)
            forced = {(h, int(p)) for h in range(2) for p in scores[row, h].topk(per_head).indices}
            flat = scores[row].clone()
            for h, p in forced:
                flat[h, p] = float("inf")
            top = flat.flatten().topk(budget * 2).indices
            expected = {(int(i) // 16, int(i) % 16) for i in top}
            kept = set(zip(layer.heads[row].tolist(), layer.positions[row].tolist(), strict=True))
            assert kept == expected, (layer_idx, row)
        lengths = layer.head_lengths()
        assert lengths.sum(1).tolist() == [budget * 2] * 2 and int(lengths.min()) >= math.ceil(floor * budget)


def test_resident_bytes_are_the_kept_slots_times_slot_bytes_plus_metadata():
    model = tiny_llama(num_key_value_heads=2)
    ids, mask = padded_batch(length=40, pad=6)
    with EvictionCache(model, policy="snapkv", budget=8, sinks=1, recent=2, slack=0, adaptive=True) as cache:
        generate(model, cache, ids, mask, max_new_tokens=3, min_new_tokens=3)
        slot_bytes = 2 * 16 * 4  # key + value, head_dim 16, fp32
        kept = sum(int(layer.head_lengths().sum()) for layer in adaptive_layers(cache))
        assert kept == 2 * 2 * 8 * 2  # layers x rows x budget x kv heads: rows need no padding
        assert cache_nbytes(cache) == kept * slot_bytes + cache.metadata_nbytes()
        assert any(len(set(layer.head_lengths().flatten().tolist())) > 1 for layer in adaptive_layers(cache)), \
            "expected uneven heads (else the test does not tell a flat pool from padded heads)"


def test_quantized_slots_gather_and_stay_below_full_precision():
    model = tiny_llama(num_key_value_heads=2)
    ids, mask = padded_batch(length=40, pad=6)
    sizes = {}
    for bits in (None, 4):
        with EvictionCache(model, policy="snapkv", budget=16, sinks=1, recent=2, slack=0, adaptive=True, bits=bits,
                           group_size=16, residual_length=4) as cache:
            out = generate(model, cache, ids, mask, max_new_tokens=4, min_new_tokens=4)
            assert torch.isfinite(torch.stack(out.logits)).all()
            sizes[bits] = cache_nbytes(cache) - cache.metadata_nbytes()
            assert all(layer.physical_length == 2 * 16 for layer in adaptive_layers(cache))
    assert sizes[4] < 0.6 * sizes[None]


def test_per_head_lengths_survive_beam_reorder_and_batch_select():
    model = tiny_llama(num_key_value_heads=2)
    ids, mask = padded_batch(length=30, pad=3)
    with EvictionCache(model, policy="knorm", budget=6, sinks=1, recent=1, slack=0, adaptive=True) as cache:
        model(input_ids=ids, attention_mask=mask, **{cache_kwarg(model): cache})
        layer = adaptive_layers(cache)[0]
        lengths, positions = layer.head_lengths().clone(), layer.positions.clone()
        assert not torch.equal(lengths[0], lengths[1]), "rows should differ for this test to mean something"
        cache.reorder_cache(torch.tensor([1, 0]))
        assert torch.equal(layer.head_lengths(), lengths.flip(0)) and torch.equal(layer.positions, positions.flip(0))
        assert layer.n_pad.tolist() == [3, 0]
        cache.batch_select_indices(torch.tensor([0]))
        assert torch.equal(layer.head_lengths(), lengths[1:]) and layer.n_pad.tolist() == [3]
    with EvictionCache(model, policy="snapkv", budget=6, sinks=1, recent=1, slack=0, adaptive=True) as cache:
        out = generate(model, cache, ids, mask, num_beams=2, max_new_tokens=4, min_new_tokens=4)
        assert out.sequences.shape == (2, 34) and torch.isfinite(torch.stack(out.logits)).all()
        for layer in adaptive_layers(cache):
            assert layer.head_lengths().sum(1).tolist() == [12] * 4  # 2 rows x 2 beams, budget x heads each


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"policy": "streaming"}, r"adaptive=True needs a policy .* policy='streaming'"),
        ({"policy": "random"}, r"adaptive=True needs a policy .* policy='random'"),
        ({"policy": "tova"}, r"adaptive=True needs a policy .* policy='tova'"),
        ({"policy": "snapkv", "head_floor": 1.5}, r"head_floor=1.5 must be a number in \[0, 1\]"),
        ({"policy": "snapkv", "head_floor": -0.1}, r"head_floor=-0.1"),
        ({"policy": "snapkv", "bits": 4, "key_mode": "channel"}, r"key_mode='channel' is not supported with adaptive"),
        ({"policy": "snapkv", "adaptive": "yes"}, r"adaptive='yes' must be True"),
    ],
)
def test_bad_adaptive_input_raises_clear_value_error(kwargs, match):
    model = tiny_llama()
    kwargs = {"adaptive": True, "budget": 32, **kwargs}
    with pytest.raises(ValueError, match=match):
        EvictionCache(model, **kwargs)
    assert attention_implementation(model) == "sdpa"


def test_registered_strategies_accept_adaptive():
    model = tiny_llama()
    cache = build_cache("snapkv", model, ratio=0.5, adaptive=True, head_floor=0.1)
    try:
        assert isinstance(cache.layers[0], AdaptiveEvictionLayer) and cache.layers[0].head_floor == 0.1
    finally:
        cache.detach()


def test_pyramid_layer_budgets_fall_with_depth_and_keep_the_total():
    from kvpress_lite.eviction.adaptive import pyramid_shares

    shares = pyramid_shares(4, beta=4)
    assert shares == pytest.approx([1.75, 1.25, 0.75, 0.25]) and sum(shares) == pytest.approx(4)
    model = tiny_llama(num_layers=4)
    ids, mask = padded_batch(length=40, pad=3)
    with EvictionCache(model, policy="snapkv", budget=8, sinks=0, recent=2, slack=0, adaptive=True,
                       pyramid_beta=4) as cache:
        out = generate(model, cache, ids, mask, max_new_tokens=3, min_new_tokens=3)
        assert torch.isfinite(torch.stack(out.logits)).all()
        assert [layer.budget for layer in cache.layers] == [14, 10, 6, 2]
        assert [layer.physical_length for layer in cache.layers] == [28, 20, 12, 4]  # x 2 kv heads
    with pytest.raises(ValueError, match="pyramid_beta=4 needs adaptive=True"):
        EvictionCache(model, policy="snapkv", budget=32, pyramid_beta=4)
    with pytest.raises(ValueError, match="pyramid_beta=0.5 must be a number >= 1"):
        EvictionCache(model, policy="snapkv", budget=32, adaptive=True, pyramid_beta=0.5)


def test_one_kv_head_makes_adaptive_the_uniform_cache():
    """Gemma-3-270M has one KV head per layer: per-head budgets then keep exactly the uniform cache's tokens."""
    model = tiny_llama(num_key_value_heads=1)
    ids, mask = padded_batch(length=40, pad=6)
    outs, kept = {}, {}
    for adaptive in (False, True):
        with EvictionCache(model, policy="snapkv", budget=10, sinks=1, recent=2, slack=0, adaptive=adaptive) as cache:
            outs[adaptive] = generate(model, cache, ids, mask, max_new_tokens=4, min_new_tokens=4)
            kept[adaptive] = [layer.positions.reshape(2, -1).sort(-1).values for layer in cache.layers]
    assert all(torch.equal(a, b) for a, b in zip(kept[False], kept[True], strict=True))
    assert torch.equal(outs[False].sequences, outs[True].sequences)
    diff = max((a - b).abs().max().item() for a, b in zip(outs[False].logits, outs[True].logits, strict=True))
    assert diff <= 1e-5
