"""FixedSlotEvictionCache: exact when nothing is evicted, constant bytes, one compiled graph, beam search, bad input."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import greedy_with_logits, left_padded_prompt, tiny_gemma3, tiny_llama
from transformers import CompileConfig

from kvpress_lite import EvictionCache, FixedSlotEvictionCache, build_cache, cache_nbytes
from kvpress_lite._compat import DynamicCache, cache_kwarg
from kvpress_lite.eviction.fixed_slot import SUPPORTED_POLICIES, FixedSlotLayer
from kvpress_lite.eviction.fixed_slot_store import SlotKV
from kvpress_lite.eviction.policy import EvictionBudget, make_policy

SMALL = dict(budget=24, sinks=2, recent=8)  # 40-token prompts: 16 slots + a 9-entry ring per (row, kv head)


def _compile_config():
    config = CompileConfig(backend="aot_eager", fullgraph=True, mode=None, dynamic=False)
    config._compile_all_devices = True  # generate compiles only on accelerators unless told
    return config


# ---------------------------------------------------------------------------------------------- model-free layer
def _decoding_layer(policy="h2o", budget=6, sinks=1, recent=2, prompt=6, seed=0, **params):
    """A FixedSlotLayer that took a `[1, 2, prompt, 8]` random prompt and started decoding (no model)."""
    torch.manual_seed(seed)
    layer = FixedSlotLayer(make_policy(policy, **params), EvictionBudget(budget, None, sinks, recent, 0), 0, SlotKV)
    keys, values = torch.randn(2, 1, 2, prompt, 8).unbind(0)
    layer.update(keys, values)
    layer.prompt.observe(torch.randn(1, 4, prompt, 8), keys)  # no mask: causal, no padding
    layer.start_decoding()
    return layer


def _step(layer, seed=1):
    torch.manual_seed(seed)
    key, value, query = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 4, 1, 8)
    k, v = layer.update(key, value)
    return layer.attend(None, None, query, k, v, None)[0], query


def test_leaving_token_replaces_the_lowest_slot_only_if_it_ranks_higher():
    """H2O's greedy step: the token leaving the ring takes the lowest-scored non-sink slot iff it scores higher."""
    layer = _decoding_layer()  # budget 6 = 4 slots (sink 0, 1, 2, one empty) + recent 2; ring of 3 holds 3, 4, 5
    s = layer.store.slots
    assert s == 4 and layer.positions[0, 0].tolist() == [0, 1, 2, -1, 3, 4, 5]
    _step(layer)  # L = 6: position 3 leaves ring entry 0 for the empty slot, 6 enters the ring
    assert layer.positions[0, 0].tolist() == [0, 1, 2, 3, 6, 4, 5]
    layer.scores[0, 0, :s] = torch.tensor([0.0, 5.0, 1.0, 3.0])  # sink 0 is protected despite its 0 score
    layer.scores[0, 0, s + 1] = 2.0  # position 4 (ring entry 1) leaves at step L = 7: beats slot 2 (score 1)
    layer.scores[0, 1, :s] = torch.tensor([0.0, 5.0, 4.0, 3.0])
    layer.scores[0, 1, s + 1] = 2.0  # head 1: loses against every slot, dropped
    _step(layer)
    assert layer.positions[0, 0].tolist() == [0, 1, 4, 3, 6, 7, 5]  # slot 2 <- position 4, ring entry 1 <- token 7
    assert layer.positions[0, 1].tolist() == [0, 1, 2, 3, 6, 7, 5]
    assert int(layer.length) == 8


def test_step_attention_and_scores_match_a_dense_reference():
    """The step's output is softmax attention over the valid entries; h2o scores grow by each entry's probability."""
    layer = _decoding_layer(budget=8, prompt=5)  # 6 slots, 2 filled (0, 1); the ring of 3 holds 2, 3, 4
    torch.manual_seed(1)
    key, value, query = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 4, 1, 8)
    keys, values = layer.update(key, value)  # position 2 leaves the ring for an empty slot; 5 enters it
    before = layer.scores.clone()
    out = layer.attend(None, None, query, keys, values, None)[0]
    valid = layer.positions[0] >= 0  # (H, N)
    assert valid.sum().item() == 2 * 6 and layer.positions[0, 0].tolist() == [0, 1, 2, -1, -1, -1, 3, 4, 5]
    assert torch.equal(keys[0, :, 8], key[0, :, 0])  # ring entry 5 % 3
    logits = (query.view(2, 2, 8) @ keys[0].transpose(-1, -2)) * 8**-0.5  # (H, G, N)
    probs = logits.masked_fill(~valid[:, None], -float("inf")).softmax(-1)
    torch.testing.assert_close(out[0, 0], (probs @ values[0]).reshape(4, 8))
    torch.testing.assert_close(layer.scores[0], torch.where(valid, before[0], 0.0) + probs.sum(1))


@pytest.mark.parametrize("policy", ["snapkv", "h2o", "tova"])
def test_a_step_does_not_depend_on_slot_order(policy):
    """Slots are in no particular order once replaced: permuting them changes neither the step's output nor any
    token's new score. SnapKV max-pools its scores over neighbouring positions (as EvictionCache, whose slots stay in
    position order), not over neighbouring slots."""
    layers = [_decoding_layer(policy, budget=8, prompt=8, **({"kernel": 3} if policy == "snapkv" else {}))
              for _ in range(2)]
    perm = torch.tensor([0, 3, 1, 4, 2, 5, 6, 7, 8])  # slots 1..4 shuffled (5: empty, 6..8: the ring)
    shuffled = layers[1]
    for tensor in (shuffled.store.keys, shuffled.store.values, shuffled.positions, shuffled.scores):
        tensor.copy_(tensor[:, :, perm])
    assert shuffled.positions[0, 0].tolist() == [0, 3, 1, 4, 2, -1, 6, 7, 5]
    outs = [_step(layer)[0] for layer in layers]
    torch.testing.assert_close(outs[1], outs[0])
    for head in range(2):
        by_position = [dict(zip(layer.positions[0, head].tolist(), layer.scores[0, head].tolist())) for layer in layers]
        assert by_position[1].keys() == by_position[0].keys()
        for position, score in by_position[0].items():
            assert by_position[1][position] == pytest.approx(score, rel=1e-6), (head, position)


def test_streaming_keeps_sinks_and_the_most_recent_tokens():
    """StreamingLLM through fixed slots: after any number of steps the kept positions are exactly the sinks and the
    last budget - sinks tokens before the incoming one (the oldest non-sink slot is replaced each step)."""
    layer = _decoding_layer("streaming", budget=6, sinks=2, recent=2, prompt=10)
    for step in range(7):
        _step(layer, seed=step)
    length = int(layer.length)
    assert length == 17
    for head in range(2):
        assert sorted(layer.positions[0, head].tolist()) == [0, 1] + list(range(length - 5, length))


# ---------------------------------------------------------------------------------------------- with a model
@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
@pytest.mark.parametrize("policy", SUPPORTED_POLICIES)
def test_budget_above_the_length_equals_dynamic_cache(policy, make_model):
    """fp32, batch 2, one row left-padded: with room for every token (prompt 40 + 30 new < 100) the fixed-slot step
    attends to exactly DynamicCache's keys: the same tokens, logits equal to float rounding."""
    model = make_model()
    ids, mask = left_padded_prompt()
    seq_ref, logits_ref = greedy_with_logits(model, DynamicCache(config=model.config), ids, mask, 30)
    with FixedSlotEvictionCache(model, policy=policy, budget=100) as cache:
        seq, logits = greedy_with_logits(model, cache, ids, mask, 30)
    assert torch.equal(seq, seq_ref)
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_resident_bytes_are_constant_while_decoding(bits):
    """From the first decode step on, the cache holds the same bytes (preallocated slots, written in place), and
    exactly the layout's: budget + 1 entries of keys and values (codes + scales for bits), positions and scores."""
    model = tiny_llama()
    ids, mask = left_padded_prompt()
    cache = FixedSlotEvictionCache(model, group_size=16, bits=bits, **SMALL)
    key = cache_kwarg(model)
    with cache:
        out = model(input_ids=ids, attention_mask=mask, **{key: cache})
        sizes = []
        for _ in range(12):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=mask, **{key: cache})
            sizes.append(cache_nbytes(cache))
    assert len(set(sizes)) == 1
    b, h, d, n, ring = 2, 2, 16, 25, 9
    kv = 2 * b * h * n * d * 4 if bits is None else 2 * b * h * ((n - ring) * (d * bits // 8 + 2 * 4 * d // 16)
                                                                   + ring * d * 4)
    per_layer = kv + b * h * n * (4 + 4) + b * 8 + 8  # + positions int32, scores fp32, n_pad, length
    assert sizes[0] == 2 * per_layer


@pytest.mark.parametrize(("policy", "bits"), [("h2o", None), ("snapkv", 4), ("tova", 8)])
def test_compiled_by_generate_is_one_graph_with_the_uncompiled_tokens(policy, bits):
    """generate's automatic compile (forced on CPU, aot_eager, fullgraph, a recompile raises): one graph for every
    decode step, the same greedy tokens and logits as the uncompiled cache, while evicting (budget 24 of 70)."""
    model = tiny_llama()
    ids, mask = left_padded_prompt()
    with FixedSlotEvictionCache(model, policy=policy, bits=bits, group_size=16, **SMALL) as cache:
        assert cache.is_compileable
        seq_ref, logits_ref = greedy_with_logits(model, cache, ids, mask, 30)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        with FixedSlotEvictionCache(model, policy=policy, bits=bits, group_size=16, **SMALL) as cache:
            seq, logits = greedy_with_logits(model, cache, ids, mask, 30, compile_config=_compile_config())
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(seq, seq_ref)
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-5)


def test_compiled_hybrid_gemma3():
    """Gemma 3: sliding layers are the static cache's compileable ones; one graph, the uncompiled tokens."""
    model = tiny_gemma3()
    ids, mask = left_padded_prompt()
    with FixedSlotEvictionCache(model, **SMALL) as cache:
        seq_ref, _ = greedy_with_logits(model, cache, ids, mask, 20)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        with FixedSlotEvictionCache(model, **SMALL) as cache:
            seq, _ = greedy_with_logits(model, cache, ids, mask, 20, compile_config=_compile_config())
    assert torch.equal(seq, seq_ref)


def test_beam_search_reorders_slots_and_scores():
    """Beam search: lossless, the same beams as DynamicCache; evicting, `reorder_cache` permutes every buffer's rows
    in place (slots, ring, positions, scores), keeping their addresses."""
    model = tiny_llama()
    ids = torch.randint(1, 128, (2, 30), generator=torch.Generator().manual_seed(0))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, num_beams=3, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **{cache_kwarg(model): DynamicCache(config=model.config)}, **kw)
    with FixedSlotEvictionCache(model, policy="h2o", budget=100) as cache:
        out = model.generate(ids, **{cache_kwarg(model): cache}, **kw)
    assert torch.equal(out, ref)
    with FixedSlotEvictionCache(model, policy="h2o", budget=16, sinks=2, recent=4) as cache:
        model.generate(ids, **{cache_kwarg(model): cache}, **kw)
        layer = cache.layers[0]
        state = [layer.store.keys, layer.positions, layer.scores]
        before = [t.clone() for t in state]
        pointers = [t.data_ptr() for t in state]
        beam_idx = torch.tensor([5, 0, 3, 1, 4, 2])
        cache.reorder_cache(beam_idx)
    for old, new, ptr in zip(before, state, pointers):
        assert torch.equal(new, old[beam_idx]) and new.data_ptr() == ptr


def test_chunked_prefill_and_registry():
    """A prompt prefilled in chunks is evicted chunk by chunk (as EvictionCache) and decodes from `budget` entries;
    the registry builds the cache with policy parameters."""
    model = tiny_llama()
    ids, mask = left_padded_prompt(length=64)
    with FixedSlotEvictionCache(model, policy="snapkv", ratio=0.5, sinks=2, recent=8, window=4) as cache:
        seq, _ = greedy_with_logits(model, cache, ids, mask, 8, prefill_chunk_size=16)
        assert cache.layers[0].capacity == 33 and cache.layers[0].positions.shape == (2, 2, 33)
        assert int(cache.get_seq_length()) == 64 + 7
    with build_cache("fixed_slot", model, policy="snapkv", budget=24, window=4, kernel=3, bits=4,
                     group_size=16) as cache:
        assert cache.policy.window == 4 and cache.policy.kernel == 3
        greedy_with_logits(model, cache, ids, mask, 4)


def test_every_policy_evicts_within_its_budget():
    """Each supported policy decodes 20 tokens past a 24-token budget: every entry (24 + the incoming token) filled,
    sinks kept in every row
    (pads excluded), positions distinct."""
    model = tiny_llama()
    ids, mask = left_padded_prompt()
    for policy in SUPPORTED_POLICIES:
        with FixedSlotEvictionCache(model, policy=policy, **SMALL) as cache:
            greedy_with_logits(model, cache, ids, mask, 20)
        for layer in cache.layers:
            pos = layer.positions
            assert pos.shape == (2, 2, 25) and bool((pos >= layer.n_pad[:, None, None]).all()), policy
            for row, pad in enumerate(layer.n_pad.tolist()):
                for head in range(2):
                    kept = pos[row, head].tolist()
                    assert {pad, pad + 1} <= set(kept) and len(set(kept)) == 25, policy


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(budget=10, sinks=4, recent=8), "budget=10 must be >= max\\(sinks, 1\\) \\+ recent = 12"),
    (dict(budget=8, sinks=0, recent=8), "budget=8 must be >= max\\(sinks, 1\\) \\+ recent = 9"),
    (dict(budget=24, policy="expected_attention"), "policy='expected_attention' is not supported.*accepted values"),
    (dict(budget=24, bits=2), "bits=2 is not supported.*accepted values: \\[None, 8, 4\\]"),
    (dict(budget=24, recent=-1), "recent=-1 must be an integer >= 0"),
    (dict(budget=24, bits=4, group_size=5), "group_size=5 must divide head_dim=16"),
    (dict(budget=24, policy="h2o", kernel=3), "unknown parameter"),
])
def test_bad_arguments_raise_naming_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FixedSlotEvictionCache(tiny_llama(), **kwargs)


def test_batch_change_and_multi_token_forwards_while_decoding_raise():
    model = tiny_llama()
    ids, mask = left_padded_prompt()
    key = cache_kwarg(model)
    with FixedSlotEvictionCache(model, **SMALL) as cache:
        model(input_ids=ids, attention_mask=mask, **{key: cache})
        model(input_ids=ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), **{key: cache})
        with pytest.raises(ValueError, match="batch size changed from 2 to 1"):
            model(input_ids=ids[:1, :1], attention_mask=torch.ones(1, 42, dtype=torch.long), **{key: cache})
        cache.layers[0]._pending, cache._last_layer = False, -1  # the failed forward stopped at layer 0
        with pytest.raises(ValueError, match="one token per forward"):
            model(input_ids=ids[:, :3], attention_mask=torch.ones(2, 44, dtype=torch.long), **{key: cache})
        cache.layers[0]._pending, cache._last_layer = False, -1


def test_batch_operations_between_steps_reallocate_and_follow():
    """`batch_repeat_interleave` / `batch_select_indices` after the prompt moved into the slots: new buffers with the
    rows repeated / selected, and decoding goes on from them exactly as from a cache built for that batch."""
    model = tiny_llama()
    ids, mask = left_padded_prompt()
    key = cache_kwarg(model)
    with FixedSlotEvictionCache(model, **SMALL) as cache:
        model(input_ids=ids, attention_mask=mask, **{key: cache})
        cache.start_decoding()
        layer = cache.layers[0]
        before = layer.positions.clone(), layer.store.keys.clone()
        cache.batch_repeat_interleave(2)
        assert torch.equal(layer.positions, before[0].repeat_interleave(2, 0))
        assert torch.equal(layer.store.keys, before[1].repeat_interleave(2, 0))
        cache.batch_select_indices(torch.tensor([2, 3]))  # both copies of row 1 (the left-padded one)
        assert torch.equal(layer.positions, before[0][[1, 1]]) and layer.n_pad.tolist() == [5, 5]
        out = model(input_ids=ids[[1, 1], -1:], attention_mask=torch.cat([mask[[1, 1]], mask[:2, :1]], 1),
                    **{key: cache})
    assert torch.equal(out.logits[0], out.logits[1])


def test_same_prompt_eviction_as_eviction_cache():
    """The prompt is evicted by EvictionLayer itself: right after prefill (slack 0) the fixed-slot layer holds exactly
    the positions EvictionCache keeps."""
    model = tiny_llama()
    ids, mask = left_padded_prompt()
    key = cache_kwarg(model)
    with EvictionCache(model, policy="snapkv", slack=0, **SMALL) as ref, \
            FixedSlotEvictionCache(model, policy="snapkv", slack=0, **SMALL) as cache:
        model(input_ids=ids, attention_mask=mask, **{key: ref})
        model(input_ids=ids, attention_mask=mask, **{key: cache})
        cache.get_mask_sizes(1, 0)  # what generate's first decode step does: move the prompt into the slots
        for layer, ref_layer in zip(cache.layers, ref.layers):
            kept = layer.positions.sort(-1).values  # budget tokens and the incoming token's empty entry
            assert bool((kept[..., 0] == -1).all()) and torch.equal(kept[..., 1:], ref_layer.positions)


@pytest.mark.parametrize(("policy", "params"),
                         [("h2o", {}), ("h2o", {"average": True}), ("tova", {}), ("streaming", {})])
@pytest.mark.parametrize("recent", [8, 0])
def test_decoding_keeps_what_eviction_cache_keeps_without_slack(policy, params, recent):
    """Step for step, the fixed-slot cache is `EvictionCache(slack=0)` at the same budget: after the step of token L
    it holds EvictionCache's tokens after the step of L - 1, plus L (whose fate EvictionCache decides at the end of
    its step, the fixed-slot cache at the start of the next), in every row and head; the logits agree. (SnapKV's
    max-pooling makes exact score ties, which `topk` and `argmin` break differently: see the test below.)"""
    model = tiny_llama()
    ids, mask = left_padded_prompt()
    key = cache_kwarg(model)
    feed = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(3))
    kw = dict(policy=policy, budget=24, sinks=2, recent=recent, slack=0, **params)
    with EvictionCache(model, **kw) as ref, FixedSlotEvictionCache(model, **kw) as cache:
        ref_out = model(input_ids=ids, attention_mask=mask, **{key: ref})
        out = model(input_ids=ids, attention_mask=mask, **{key: cache})
        previous = None
        for step in range(feed.shape[1]):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            ref_out = model(input_ids=feed[:, step:step + 1], attention_mask=mask, **{key: ref})
            out = model(input_ids=feed[:, step:step + 1], attention_mask=mask, **{key: cache})
            torch.testing.assert_close(out.logits, ref_out.logits, atol=1e-5, rtol=1e-5)
            length = 40 + step
            for layer in cache.layers:
                held = [[sorted(p for p in layer.positions[r, h].tolist() if p >= 0) for h in range(2)]
                        for r in range(2)]
                if previous is not None:
                    expected = [[sorted(previous[layer.layer_idx][r][h] + [length]) for h in range(2)]
                                for r in range(2)]
                    assert held == expected, (policy, step, layer.layer_idx)
            previous = [ref_layer.positions.tolist() for ref_layer in ref.layers]
    assert min(ref.layers[0].positions[0, 0].tolist()) == 0 and ref.layers[0].physical_length == 24


def test_slack_widens_the_ring_within_the_budget():
    """EvictionCache's slack lets its protected window swing from `recent` to `recent + slack` tokens; the fixed-slot
    cache protects `recent + slack // 2` within the same budget (budget 24, recent 8, slack 4: 14 slots, a ring of
    11 entries), so after each step the last 11 positions are all kept (h2o alone drops them: their sums are small)."""
    model = tiny_llama()
    ids, mask = left_padded_prompt()
    with FixedSlotEvictionCache(model, budget=24, sinks=2, recent=8, slack=4) as cache:
        greedy_with_logits(model, cache, ids, mask, 16)
    length = 40 + 15
    for layer in cache.layers:
        assert (layer.store.slots, layer.window, layer.capacity) == (14, 11, 25)
        for row in range(2):
            for head in range(2):
                kept = set(layer.positions[row, head].tolist())
                assert set(range(length - 11, length)) <= kept and -1 not in kept


def test_the_prompt_moves_its_best_scored_tokens_into_fewer_slots():
    """When the ring protects more than the prompt's `recent` (slack), the prompt's others may exceed the slots: the
    lowest-scored are dropped, not the newest."""
    torch.manual_seed(0)
    layer = FixedSlotLayer(make_policy("h2o"), EvictionBudget(8, None, 1, 2, 4), 0, SlotKV)  # protects 2 + 4 // 2
    keys, values = torch.randn(2, 1, 1, 10, 4).unbind(0)
    layer.update(keys, values)
    layer.prompt.observe(torch.randn(1, 1, 10, 4), keys)  # 10 <= budget + slack: nothing evicted yet
    layer.prompt.scores.copy_(torch.tensor([0.0, 5.0, 1.0, 4.0, 3.0, 0.1, 0.2, 2.0, 0.0, 0.0]))
    layer.start_decoding()  # the prompt keeps 8 (drops 5, 6); 4 slots for 0..4: the sink, 1, 3, 4 (2 scores lowest)
    assert (layer.store.slots, layer.window) == (4, 5)
    assert layer.positions[0, 0].tolist() == [0, 1, 3, 4, -1, -1, 7, 8, 9]  # ring entry p % 5; 5, 6 evicted


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor's CPU backend needs a C++ compiler")
def test_inductor_writes_the_slots_in_place():
    """The compiled step must not copy the preallocated slots: inductor's code for a decode step (CPU backend) holds
    no loop over a whole keys buffer. Replacing a slot with gather + `scatter_` made inductor copy both buffers every
    step (3x the memory traffic of reading them); `index_put_` writes in place."""
    from torch._inductor.utils import run_and_get_code

    model = tiny_llama(num_layers=1, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    config = CompileConfig(backend="inductor", fullgraph=True, mode=None, dynamic=False)
    config._compile_all_devices = True
    torch._dynamo.reset()
    with FixedSlotEvictionCache(model, budget=1000, recent=16) as cache:
        _, code = run_and_get_code(lambda: greedy_with_logits(model, cache, ids, torch.ones_like(ids), 3,
                                                              compile_config=config))
        numel = cache.layers[0].store.keys.numel()  # 1 x 2 x 1000 x 64
    code = "\n".join(code)
    assert "index_put" in code  # the step's slot writes are in this code
    assert f"{numel}L" not in code and f"{numel})" not in code


def test_rows_with_fewer_real_tokens_than_the_ring():
    """A row whose real tokens all fit in the ring (its pads reach the last `recent` positions, and eviction drops
    them first) still moves into the slots: its real tokens are kept, it decodes like a batch of one."""
    model = tiny_llama()
    ids, mask = left_padded_prompt(pad=36)  # row 1: 4 real tokens of 40, ring of 8, budget 16
    kw = dict(budget=16, sinks=2, recent=8)
    with FixedSlotEvictionCache(model, **kw) as cache:
        seq, logits = greedy_with_logits(model, cache, ids, mask, 6)
    layer = cache.layers[0]
    real = sorted(p for p in layer.positions[1, 0].tolist() if p >= 36)
    assert real == list(range(36, 45))  # 4 real prompt tokens + 5 decoded, none evicted
    with FixedSlotEvictionCache(model, **kw) as cache:
        seq1, logits1 = greedy_with_logits(model, cache, ids[1:, 36:], mask[1:, 36:], 6)
    assert torch.equal(seq[1, 36:], seq1[0])
    torch.testing.assert_close(logits[:, 1], logits1[:, 0], atol=1e-5, rtol=1e-5)


def test_eval_harness_runs_the_fixed_slot_strategy(tmp_path):
    """The harness (smoke recipe, perplexity token by token + a batched passkey with left padding) runs strategy
    `fixed_slot` and writes its metrics (its `get_seq_length` is a device tensor while decoding)."""
    import json
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-m", "eval", "recipes/smoke.yaml", f"output_dir={tmp_path}",
                           "caches.int4=null", "caches.h2o.strategy=fixed_slot", "perplexity.chunk_size=1",
                           "--no-report"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(p.read_text()) for p in tmp_path.glob("smoke/tiny-llama/*/h2o-*/metrics.json")]
    assert len(metrics) == 2 and all(isinstance(m["cache_tokens"], int) for m in metrics)
    assert any(m["perplexity"] for m in metrics)
