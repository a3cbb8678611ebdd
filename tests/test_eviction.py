"""Eviction family: model-free layer tests on random (2, 4, 8, 16) tensors, then integration on tiny random models
(exactness against DynamicCache and against an explicitly masked reference) and SmolLM2 (memory)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import padded_batch, tiny_gemma3, tiny_llama
from transformers import AttentionInterface, DynamicCache, StoppingCriteria, StoppingCriteriaList
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvpress_lite import EvictionCache, HeavyHitterCache, build_cache, cache_nbytes, get_strategy
from kvpress_lite._compat import DynamicSlidingWindowLayer, attention_implementation, cache_kwarg
from kvpress_lite.eviction import POLICIES, EvictionBudget, EvictionLayer, make_policy

B, H_KV, T, D = 2, 4, 8, 16
H_Q = 8  # two query heads per kv head (GQA)
ALL_POLICIES = ["h2o", "tova", "snapkv", "knorm", "streaming", "random"]
LEADING_POLICIES = ["expected_attention", "kvzip"]  # scored against their own references in test_policies.py


# ----------------------------------------------------------------------------------------------- model-free helpers


def make_layer(policy: str, budget: int, sinks: int = 0, recent: int = 0, slack: int = 0, **params) -> EvictionLayer:
    return EvictionLayer(make_policy(policy, **params), EvictionBudget(budget, None, sinks, recent, slack))


def causal_pad_mask(n_pad: list[int], q: int, P: int) -> torch.Tensor:
    """bool [B, 1, q, P]: query i (key P - q + i) sees keys <= itself that are not among the row's leading pads."""
    key = torch.arange(P)
    causal = key[None, :] <= (torch.arange(q) + P - q)[:, None]  # (q, P)
    real = key[None, :] >= torch.tensor(n_pad)[:, None]  # (B, P)
    return (causal[None] & real[:, None, :])[:, None]


def reference_mass(query, keys, mask, rows=None):
    """Naive attention mass: expand kv heads, softmax per query head, keep last `rows` real queries, sum per kv head."""
    G = query.shape[1] // keys.shape[1]
    logits = query @ keys.repeat_interleave(G, dim=1).transpose(-1, -2) / math.sqrt(query.shape[-1])
    probs = logits.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)  # (B, Hq, q, P)
    if rows is not None:
        probs = probs[:, :, -rows:]
    return probs.sum(2).view(keys.shape[0], keys.shape[1], G, -1).sum(2)  # (B, Hkv, P)


def reference_scores(policy: str, query, keys, mask, positions, **params) -> torch.Tensor:
    """Each policy's score computed independently of the library, [B, Hkv, P]."""
    if policy == "h2o":
        return reference_mass(query, keys, mask)
    if policy == "tova":
        return reference_mass(query, keys, mask, rows=1).mean(1, keepdim=True).expand(B, H_KV, -1)
    if policy == "snapkv":
        mass = reference_mass(query, keys, mask, rows=params["window"])
        k = params["kernel"] // 2
        return torch.stack([mass[..., max(j - k, 0) : j + k + 1].amax(-1) for j in range(mass.shape[-1])], dim=-1)
    if policy == "knorm":
        return -keys.norm(dim=-1)
    if policy == "streaming":
        return positions.float()
    if policy == "random":
        return torch.rand(keys.shape[:3], generator=torch.Generator().manual_seed(params["seed"]))
    raise AssertionError(policy)


POLICY_PARAMS = {"snapkv": {"window": 3, "kernel": 3}, "random": {"seed": 7}}


# ---------------------------------------------------------------------------------------------- model-free tests


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_policy_keeps_exactly_its_top_scored_tokens(policy):
    torch.manual_seed(0)
    keys, values, query = torch.randn(B, H_KV, T, D), torch.randn(B, H_KV, T, D), torch.randn(B, H_Q, T, D)
    params = POLICY_PARAMS.get(policy, {})
    layer = make_layer(policy, budget=5, **params)
    out_k, _ = layer.update(keys, values)
    assert out_k.shape == (B, H_KV, T, D)  # attention reads the full prompt once
    layer.observe(query, out_k, None, None, scaling=D**-0.5)  # no mask: causal, no padding
    positions = torch.arange(T).expand(B, H_KV, T)
    expected = reference_scores(policy, query, keys, causal_pad_mask([0, 0], T, T), positions, **params)
    kept = expected.topk(5, dim=-1).indices.sort(-1).values
    assert torch.equal(layer.positions.long(), kept)
    assert torch.equal(layer.store.keys, keys.gather(2, kept[..., None].expand(-1, -1, -1, D)))
    assert torch.equal(layer.store.values, values.gather(2, kept[..., None].expand(-1, -1, -1, D)))
    if POLICIES[policy].uses_attention:
        torch.testing.assert_close(layer.scores, expected.gather(2, kept), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["h2o", "tova", "snapkv"])
def test_attention_scores_match_reference_with_padding_gqa_and_eager_weights(policy):
    """Pad queries contribute nothing and pads get no mass; eager's returned weights score like sdpa's recompute."""
    torch.manual_seed(1)
    keys, values, query = torch.randn(B, H_KV, T, D), torch.randn(B, H_KV, T, D), torch.randn(B, H_Q, T, D)
    params = POLICY_PARAMS.get(policy, {})
    mask = causal_pad_mask([0, 3], T, T)
    expected = reference_scores(policy, query, keys, mask, None, **params)
    sdpa_layer, eager_layer = make_layer(policy, budget=T, **params), make_layer(policy, budget=T, **params)
    sdpa_layer.observe(query, sdpa_layer.update(keys, values)[0], mask, None, scaling=D**-0.5)
    G = H_Q // H_KV
    logits = query @ keys.repeat_interleave(G, 1).transpose(-1, -2) * D**-0.5
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    weights = (logits + additive).softmax(-1)  # what eager attention returns (uniform on all-masked pad rows)
    eager_layer.observe(query, eager_layer.update(keys, values)[0], additive, weights, scaling=D**-0.5)
    for layer in (sdpa_layer, eager_layer):
        torch.testing.assert_close(layer.scores, expected, rtol=1e-5, atol=1e-6)
        assert layer.n_pad.tolist() == [0, 3]
    if policy == "h2o":
        assert torch.all(expected[1, :, :3] == 0)  # pads never receive attention


def test_h2o_average_ranks_by_mean_attention_over_the_queries_that_saw_each_token():
    """Prompt of T then 2 decoded tokens: score = total mass / (L - position), then the top `budget` by that mean."""
    torch.manual_seed(4)
    N = T + 2
    keys, values, query = torch.randn(B, H_KV, N, D), torch.randn(B, H_KV, N, D), torch.randn(B, H_Q, N, D)
    mean = reference_mass(query, keys, causal_pad_mask([0, 0], N, N)) / (N - torch.arange(N))
    exact = make_layer("h2o", budget=N, average=True)
    for begin, end in ((0, T), (T, T + 1), (T + 1, N)):  # prefill, then two decoding steps
        cached, _ = exact.update(keys[:, :, begin:end], values[:, :, begin:end])
        exact.observe(query[:, :, begin:end], cached, None, None, scaling=D**-0.5)
    torch.testing.assert_close(exact.scores, mean, rtol=1e-5, atol=1e-6)
    # an eviction at the end of the prompt keeps the top 6 by mean, which here differ from the top 6 by sum
    prompt_sum = reference_mass(query[:, :, :T], keys[:, :, :T], causal_pad_mask([0, 0], T, T))
    by_mean = (prompt_sum / (T - torch.arange(T))).topk(6, -1).indices.sort(-1).values
    assert not torch.equal(by_mean, prompt_sum.topk(6, -1).indices.sort(-1).values)
    evicting = make_layer("h2o", budget=6, average=True)
    evicting.observe(query[:, :, :T], evicting.update(keys[:, :, :T], values[:, :, :T])[0], None, scaling=D**-0.5)
    assert torch.equal(evicting.positions.long(), by_mean)
    with pytest.raises(ValueError, match="average"):
        make_policy("h2o", average="yes")


def test_pads_are_evicted_first_and_kept_pads_lead_every_row():
    torch.manual_seed(2)
    keys, values, query = torch.randn(B, H_KV, T, D), torch.randn(B, H_KV, T, D), torch.randn(B, H_Q, T, D)
    layer = make_layer("knorm", budget=6)
    layer.observe(query, layer.update(keys, values)[0], causal_pad_mask([0, 3], T, T))
    # row 1 has 5 real tokens: all kept, plus exactly one pad, in the first slot of every head
    assert torch.all(layer.positions[1, :, 1:] == torch.arange(3, 8))
    assert torch.all(layer.positions[1, :, 0] < 3)
    # the mask transformers builds reads columns kv_offset + j: same number of pad columns as kept pad slots
    kv_length, kv_offset = layer.get_mask_sizes(1)
    assert (kv_length, kv_offset) == (7, 2)
    padding_row = torch.arange(T + 1) >= 3
    assert padding_row[kv_offset : kv_offset + kv_length].tolist() == [False] + [True] * 6
    # the next eviction drops the remaining pad before any real token
    layer.update(torch.randn(B, H_KV, 1, D), torch.randn(B, H_KV, 1, D))
    layer.observe(torch.randn(B, H_Q, 1, D), layer.store.keys, causal_pad_mask([0, 1], 1, 7))  # row 1: slot 0 is a pad
    assert torch.all(layer.positions[1] >= 3)


def test_sinks_and_recent_are_protected_counting_sinks_from_the_first_real_token():
    torch.manual_seed(3)
    keys, values, query = torch.randn(B, H_KV, T, D), torch.randn(B, H_KV, T, D), torch.randn(B, H_Q, T, D)
    layer = make_layer("knorm", budget=5, sinks=1, recent=2)
    layer.observe(query, layer.update(keys, values)[0], causal_pad_mask([0, 2], T, T))
    for row, first_real in ((0, 0), (1, 2)):
        score = -keys[row].norm(dim=-1)  # (Hkv, T)
        score[:, first_real] = score[:, -2:] = float("inf")
        score[:, :first_real] = float("-inf")
        assert torch.equal(layer.positions[row].long(), score.topk(5, -1).indices.sort(-1).values)
        assert torch.all(layer.positions[row, :, 0] == first_real)


def test_streaming_keeps_sinks_and_the_most_recent_tokens():
    layer = make_layer("streaming", budget=5, sinks=2)
    layer.observe(torch.randn(B, H_Q, T, D), layer.update(torch.randn(B, H_KV, T, D), torch.randn(B, H_KV, T, D))[0])
    assert torch.equal(layer.positions, torch.tensor([0, 1, 5, 6, 7], dtype=torch.int32).expand(B, H_KV, 5))


def test_logical_length_mask_sizes_slack_and_compact_storage():
    layer = make_layer("h2o", budget=5, recent=1, slack=2)
    keys = torch.randn(B, H_KV, T, D)
    layer.observe(torch.randn(B, H_Q, T, D), layer.update(keys, keys.clone())[0])
    assert (layer.physical_length, layer.get_seq_length()) == (5, 8)
    assert layer.get_mask_sizes(1) == (6, 3)
    for step in range(1, 4):  # P grows 6, 7 (<= budget + slack), then 8 > 7 -> back to 5
        out_k, _ = layer.update(torch.randn(B, H_KV, 1, D), torch.randn(B, H_KV, 1, D))
        assert out_k.shape[-2] == 5 + step  # update returns P_prev + q
        layer.observe(torch.randn(B, H_Q, 1, D), out_k)
        assert layer.get_seq_length() == T + step
    assert layer.physical_length == 5
    assert layer.positions[0, 0, -1].item() == T + 2  # recent=1 protects the newest token
    # kept tensors own compact storage: nothing pins the pre-eviction buffers
    kv_bytes = 2 * B * H_KV * 5 * D * 4
    assert layer.store.keys.is_contiguous() and layer.store.keys.untyped_storage().nbytes() == kv_bytes // 2
    assert cache_nbytes(layer) == kv_bytes + layer.metadata_nbytes()
    assert layer.metadata_nbytes() == B * H_KV * 5 * (4 + 4) + B * 8  # int32 positions, fp32 scores, int64 pad counts


def test_reorder_cache_permutes_scores_and_row_metadata():
    layer = make_layer("h2o", budget=5)
    layer.observe(torch.randn(B, H_Q, T, D), layer.update(torch.randn(B, H_KV, T, D), torch.randn(B, H_KV, T, D))[0],
                  causal_pad_mask([0, 2], T, T))
    state = {"keys": layer.store, "values": layer.store, "positions": layer, "scores": layer, "n_pad": layer}
    before = {name: getattr(owner, name).clone() for name, owner in state.items()}
    layer.reorder_cache(torch.tensor([1, 0]))
    for name, tensor in before.items():
        assert torch.equal(getattr(state[name], name), tensor.flip(0)), name
    assert layer.n_pad.tolist() == [2, 0]


def test_crop_is_refused_and_reset_clears():
    layer = make_layer("knorm", budget=5)
    layer.observe(torch.randn(B, H_Q, T, D), layer.update(torch.randn(B, H_KV, T, D), torch.randn(B, H_KV, T, D))[0])
    assert layer.is_croppable is False
    layer.crop(0)
    with pytest.raises(ValueError, match="crop"):
        layer.crop(-1)
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.store.keys is None


def test_unobserved_forward_raises():
    layer = make_layer("h2o", budget=5)
    layer.update(torch.randn(B, H_KV, T, D), torch.randn(B, H_KV, T, D))
    with pytest.raises(RuntimeError, match="not observed"):
        layer.update(torch.randn(B, H_KV, 1, D), torch.randn(B, H_KV, 1, D))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"budget": 10, "ratio": 0.5}, "exactly one of budget"),
        ({}, "exactly one of budget"),
        ({"budget": 5, "sinks": 4, "recent": 2}, r"budget=5 must be an integer >= max\(1, sinks \+ recent\) = 6"),
        ({"budget": 0, "sinks": 0, "recent": 0}, "budget=0"),
        ({"ratio": 0.0}, r"ratio=0.0 must be a number in \(0, 1\]"),
        ({"ratio": 1.5}, r"ratio=1.5 must be a number in \(0, 1\]"),
        ({"budget": 32, "sinks": -1}, "sinks=-1"),
        ({"budget": 32, "slack": -2}, "slack=-2"),
        ({"budget": 32, "policy": "lru"}, r"policy='lru' is unknown; accepted values: \['expected_attention', 'h2o'"),
        ({"budget": 32, "policy": "snapkv", "kernel": 4}, "kernel=4 must be an odd integer"),
        ({"budget": 32, "policy": "snapkv", "window": 0}, "window=0"),
        ({"budget": 32, "policy": "h2o", "window": 8}, r"unknown parameter\(s\) \['window'\]; accepted: \['average'\]"),
    ],
)
def test_bad_input_raises_clear_value_error(kwargs, match):
    model = tiny_llama()
    with pytest.raises(ValueError, match=match):
        EvictionCache(model, **kwargs)
    assert attention_implementation(model) == "sdpa"  # a refused cache leaves the model untouched


def test_refuses_configs_mla_and_unobservable_attention():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    with pytest.raises(ValueError, match="must be a transformers PreTrainedModel"):
        EvictionCache(tiny_llama().config, budget=32)
    mla = DeepseekV3ForCausalLM(DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=2, num_experts_per_tok=1, first_k_dense_replace=1))
    with pytest.raises(ValueError, match="multi-head latent attention"):
        EvictionCache(mla, budget=32)
    model = tiny_llama()
    model.set_attn_implementation("flex_attention")
    with pytest.raises(ValueError, match=r"accepted values: \['sdpa', 'eager'\]"):
        EvictionCache(model, budget=32)


def test_every_policy_is_registered_documented_and_builds():
    model = tiny_llama()
    assert sorted(POLICIES) == sorted(ALL_POLICIES + LEADING_POLICIES)
    for name, cls in POLICIES.items():
        strategy = get_strategy(name)
        assert strategy.family == "eviction"
        assert {"budget", "ratio", "sinks", "recent", "slack"} <= set(strategy.params)
        assert "arxiv.org/abs/" in cls.__doc__ and cls.score.__doc__
        with build_cache(name, model, budget=24, **POLICY_PARAMS.get(name, {})) as cache:
            assert isinstance(cache, EvictionCache) and cache.policy.name == name
    assert get_strategy("snapkv").params["window"] == 32 and get_strategy("random").params["seed"] == 0
    assert attention_implementation(model) == "sdpa"  # every cache left with its `with` block
    with pytest.raises(ValueError, match="unknown parameter"):
        build_cache("h2o", model, budget=24, kernel=3)


# ------------------------------------------------------------------------------------- integration: tiny models


def generate(model, cache, ids, mask, **kwargs):
    kwargs = {"max_new_tokens": 6, "do_sample": False, "return_dict_in_generate": True, "output_logits": True,
              "pad_token_id": 0, **kwargs}
    kwargs.setdefault("min_new_tokens", kwargs["max_new_tokens"])  # random weights may emit eos early
    return model.generate(input_ids=ids, attention_mask=mask, **{cache_kwarg(model): cache}, **kwargs)


def max_logit_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits, strict=True))


TINY = {"llama": tiny_llama, "gemma3": tiny_gemma3}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_budget_above_length_equals_dynamic_cache(arch, impl):
    model = TINY[arch](impl)
    ids, mask = padded_batch()
    ref = generate(model, DynamicCache(config=model.config), ids, mask)
    for policy in ALL_POLICIES:
        with EvictionCache(model, policy=policy, budget=64) as cache:
            out = generate(model, cache, ids, mask)
            assert max_logit_diff(out, ref) <= 1e-4, policy
            assert torch.equal(out.sequences, ref.sequences)
    assert attention_implementation(model) == impl


# Reference for real evictions: a DynamicCache run whose attention masks, per layer and kv head, the keys the evicting
# cache had dropped before that forward. Registered with sdpa's mask builder, so it sees the model's padding mask.
_REFERENCE_KEEP: dict[int, torch.Tensor] = {}  # layer_idx -> bool [B, Hkv, L + q] (keys that may be attended)


def _reference_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    G = query.shape[1] // key.shape[1]
    q, P = query.shape[2], key.shape[2]
    if attention_mask is None:  # sdpa skipped the mask: causal, bottom-right aligned
        allowed = (torch.arange(P)[None, :] <= torch.arange(q)[:, None] + P - q)[None, None]
    else:
        allowed = attention_mask
    keep = _REFERENCE_KEEP.get(module.layer_idx)
    if keep is not None:
        allowed = allowed & keep.repeat_interleave(G, dim=1)[:, :, None, :]
    logits = query @ key.repeat_interleave(G, 1).transpose(-1, -2) * scaling
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    return (probs @ value.repeat_interleave(G, 1)).transpose(1, 2).contiguous(), None


AttentionInterface.register("kvpress_test_reference", _reference_attention)
AttentionMaskInterface.register("kvpress_test_reference", sdpa_mask)


def keep_masks(cache: EvictionCache, q: int) -> dict[int, torch.Tensor]:
    """Per eviction layer, bool [B, Hkv, L + q]: the slots it holds plus the q tokens about to enter."""
    masks = {}
    for idx, layer in enumerate(cache.layers):
        if isinstance(layer, EvictionLayer) and layer.is_initialized:
            keep = torch.zeros(*layer.positions.shape[:2], layer.length + q, dtype=torch.bool)
            keep.scatter_(2, layer.positions.long(), True)
            keep[..., layer.length :] = True
            masks[idx] = keep
    return masks


@pytest.mark.parametrize(
    "arch, impl, policy",
    [("llama", "sdpa", "h2o"), ("llama", "eager", "h2o"), ("llama", "sdpa", "tova"), ("llama", "eager", "snapkv"),
     ("llama", "sdpa", "knorm"), ("gemma3", "sdpa", "h2o"), ("gemma3", "eager", "streaming")],
)
def test_real_eviction_equals_explicitly_masked_reference(arch, impl, policy):
    """Chunked prefill + decoding with evictions at every step, batch 2 with a left-padded row: the logits equal a
    DynamicCache run that masks exactly the evicted keys (per layer and head) at each forward."""
    model, reference = TINY[arch](impl), TINY[arch]("sdpa")
    reference.set_attn_implementation("kvpress_test_reference")
    ids, mask = padded_batch(length=15, pad=6, seed=1)
    cache = EvictionCache(model, policy=policy, budget=7, sinks=1, recent=2, slack=0, **POLICY_PARAMS.get(policy, {}))
    ref_cache = DynamicCache(config=reference.config)
    kwarg = cache_kwarg(model)
    worst, evicted_seen, total_mask, next_token = 0.0, False, mask, None
    with torch.no_grad():
        for step in range(8):  # three prefill chunks of 5 tokens, then greedy decoding
            if step < 3:
                chunk = ids[:, 5 * step : 5 * step + 5]
            else:
                chunk, total_mask = next_token, torch.cat([total_mask, torch.ones(2, 1, dtype=torch.long)], 1)
            full_mask = total_mask[:, : cache.get_seq_length() + chunk.shape[1]]
            _REFERENCE_KEEP.clear()
            _REFERENCE_KEEP.update(keep_masks(cache, chunk.shape[1]))
            evicted_seen |= any(not bool(k.all()) for k in _REFERENCE_KEEP.values())
            pos = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, -chunk.shape[1] :]
            out = model(input_ids=chunk, attention_mask=full_mask, position_ids=pos, **{kwarg: cache})
            ref = reference(input_ids=chunk, attention_mask=full_mask, position_ids=pos, **{kwarg: ref_cache})
            worst = max(worst, (out.logits - ref.logits)[full_mask[:, -chunk.shape[1] :].bool()].abs().max().item())
            next_token = out.logits[:, -1:].argmax(-1)
            for layer in cache.layers:
                if isinstance(layer, EvictionLayer):
                    assert layer.physical_length == min(layer.length, 7)  # slack=0: exactly the budget
    cache.detach()
    assert evicted_seen
    assert worst <= 1e-4


def test_generate_with_eviction_sampling_beam_search_and_continuation():
    model = tiny_llama()
    ids, mask = padded_batch(length=16, pad=5)
    # sampling: same seed and no eviction -> same tokens as DynamicCache; with eviction it still runs
    for kwargs in ({"do_sample": True, "top_k": 20}, {"num_beams": 2}):
        torch.manual_seed(0)
        ref = generate(model, DynamicCache(config=model.config), ids, mask, **kwargs)
        torch.manual_seed(0)
        with EvictionCache(model, budget=64) as cache:
            assert torch.equal(generate(model, cache, ids, mask, **kwargs).sequences, ref.sequences)
        torch.manual_seed(0)
        with EvictionCache(model, budget=8, sinks=2, recent=4) as cache:
            out = generate(model, cache, ids, mask, max_new_tokens=10, **kwargs)
            assert out.sequences.shape[1] == 26
            assert cache.get_seq_length() == 25 and cache.layers[0].physical_length <= 8
            if "num_beams" in kwargs:  # beams of a row stay in that row through every reorder_cache
                assert cache.layers[0].n_pad.tolist() == [0, 0, 5, 5]
    # a second generate call continues from the same cache
    ref_cache = DynamicCache(config=model.config)
    ref1 = generate(model, ref_cache, ids, mask)
    extra = torch.randint(3, 128, (2, 3), generator=torch.Generator().manual_seed(5))
    ids2 = torch.cat([ref1.sequences, extra], 1)
    mask2 = torch.cat([mask, torch.ones(2, ids2.shape[1] - ids.shape[1], dtype=torch.long)], 1)
    ref2 = generate(model, ref_cache, ids2, mask2)
    with EvictionCache(model, policy="h2o", budget=64) as cache:
        out1 = generate(model, cache, ids, mask)
        out2 = generate(model, cache, ids2, mask2)
        assert max_logit_diff(out1, ref1) <= 1e-4 and max_logit_diff(out2, ref2) <= 1e-4
    with EvictionCache(model, policy="h2o", budget=10, sinks=1, recent=2) as cache:
        generate(model, cache, ids, mask)
        out2 = generate(model, cache, ids2, mask2)
        assert cache.get_seq_length() == ids2.shape[1] + 5  # logical length spans both calls
        assert cache.layers[0].physical_length <= 10 and torch.isfinite(torch.stack(out2.logits)).all()


def test_ratio_budget_is_resolved_from_the_prompt():
    model = tiny_llama()
    ids, mask = padded_batch(length=20, pad=3)
    with HeavyHitterCache(model, ratio=0.5, sinks=1, recent=2) as cache:
        generate(model, cache, ids, mask, max_new_tokens=4)
        assert cache.layers[0].budget == 10 and cache.layers[0].physical_length == 10
        assert cache.get_seq_length() == 23


def test_chunked_prefill_evicts_chunk_by_chunk_and_ends_with_the_single_forward_budget():
    """generate(prefill_chunk_size=...): memory is bounded during prefill, a ratio still refers to the whole prompt."""
    model = tiny_llama()
    ids, mask = padded_batch(length=20, pad=3)
    ref = generate(model, DynamicCache(config=model.config), ids, mask)
    with EvictionCache(model, policy="h2o", budget=64) as cache:  # nothing evicted: exact, chunked or not
        assert max_logit_diff(generate(model, cache, ids, mask, prefill_chunk_size=6), ref) <= 1e-4
    for chunk in (None, 6):
        with HeavyHitterCache(model, ratio=0.5, sinks=1, recent=2) as cache:
            generate(model, cache, ids, mask, max_new_tokens=4, prefill_chunk_size=chunk)
            assert cache.layers[0].budget == 10 and cache.layers[0].physical_length == 10, chunk
    seen = []
    with EvictionCache(model, policy="tova", budget=8, sinks=1, recent=2, slack=0) as cache:
        hook = model.register_forward_hook(lambda *_: seen.append(cache.layers[0].physical_length))
        try:
            generate(model, cache, ids, mask, max_new_tokens=4, prefill_chunk_size=6)
        finally:
            hook.remove()
    assert seen[:4] == [6, 8, 8, 8]  # after chunks of 6, 6, 6, 2 prompt tokens: never above budget + chunk
    assert cache.get_seq_length() == 23 and max(seen) == 8


def test_gemma3_hybrid_evicts_full_layers_only():
    model = tiny_gemma3()
    ids, mask = padded_batch(length=24, pad=4)
    with EvictionCache(model, policy="h2o", budget=10, sinks=1, recent=2) as cache:
        kinds = [type(layer) for layer in cache.layers]
        assert kinds == [DynamicSlidingWindowLayer] * 3 + [EvictionLayer]
        generate(model, cache, ids, mask, max_new_tokens=6)
        assert cache.get_seq_length() == 29
        assert cache.layers[3].physical_length <= 10 and cache.layers[3].get_seq_length() == 29
        assert all(layer.keys.shape[-2] == 7 for layer in cache.layers[:3])  # transformers' window - 1


def test_detach_restores_the_model_and_other_caches_are_unaffected():
    model = tiny_llama()
    ids, mask = padded_batch()
    before = generate(model, DynamicCache(config=model.config), ids, mask)
    cache = EvictionCache(model, budget=8, sinks=1, recent=2)
    second = EvictionCache(model, budget=8, sinks=1, recent=2)
    assert attention_implementation(model) != "sdpa"
    during = generate(model, DynamicCache(config=model.config), ids, mask)  # another cache while attached
    assert max_logit_diff(during, before) == 0.0
    cache.detach()
    cache.detach()  # idempotent
    assert attention_implementation(model) != "sdpa"  # `second` still attached
    with second:  # leaving `with` detaches (scoped; garbage collection is only a backstop)
        assert attention_implementation(model) != "sdpa"
    assert attention_implementation(model) == "sdpa"
    with pytest.raises(RuntimeError, match="detached"):
        generate(model, cache, ids, mask)


# ------------------------------------------------------------------------------------------ integration: SmolLM2


class _RecordBytes(StoppingCriteria):
    """Records (logical length, physical length, cache_nbytes) after every decoding step."""

    def __init__(self, cache):
        self.cache, self.rows = cache, []

    def __call__(self, input_ids, scores, **kwargs):
        layer = self.cache.layers[0]
        self.rows.append((layer.get_seq_length(), layer.physical_length, cache_nbytes(self.cache)))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@pytest.mark.model
def test_smollm2_memory_is_flat_and_scales_with_budget(smollm2):
    """300-token prompt, 200 new tokens, budget 64: bytes are flat after the budget is reached and match b/L of a
    DynamicCache at the same length plus the reported metadata."""
    import pydoc_data.topics

    model, tokenizer = smollm2
    text = " ".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:20])
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :300]
    budget, new = 64, 200
    cache = EvictionCache(model, policy="h2o", budget=budget)
    recorder = _RecordBytes(cache)
    with torch.no_grad(), cache:
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, stopping_criteria=StoppingCriteriaList([recorder]),
                       **{cache_kwarg(model): cache})
        L, P, nbytes = recorder.rows[-1]
        assert L == 300 + new - 1  # the last sampled token is never fed back
        slack = cache.layers[0].slack
        assert all(p <= budget + slack for _, p, _ in recorder.rows)  # evicted during prefill too
        sizes = [b for _, _, b in recorder.rows]
        assert max(sizes) <= 1.05 * min(sizes)
        dynamic = DynamicCache(config=model.config)
        model(input_ids=torch.cat([ids, ids[:, : L - 300]], 1), **{cache_kwarg(model): dynamic})
        assert dynamic.get_seq_length() == L
        expected = P / L * cache_nbytes(dynamic) + cache.metadata_nbytes()
        assert abs(nbytes - expected) <= 0.10 * expected
        assert abs(nbytes - budget / L * cache_nbytes(dynamic) - cache.metadata_nbytes()) <= 0.10 * expected
        assert cache.metadata_nbytes() <= 0.05 * nbytes


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_one_pass_decode_attention_equals_sdpa_and_eager_probabilities(mask_kind, softcap):
    """A decode step's attention for attention-ranked policies (`observe.decode_attention`): output equal to the
    model's attention over `repeat_kv` copies, probabilities equal to eager's, grouped heads, padded keys masked."""
    from kvpress_lite.eviction import observe

    torch.manual_seed(0)
    B, Hq, Hkv, P, D = 2, 6, 2, 37, 16
    query, key, value = torch.randn(B, Hq, 1, D), torch.randn(B, Hkv, P, D), torch.randn(B, Hkv, P, D)
    allowed = torch.ones(B, 1, 1, P, dtype=torch.bool)
    allowed[1, ..., :5] = False  # row 1: five left pads
    mask = {"none": None, "bool": allowed,
            "additive": torch.zeros(B, 1, 1, P).masked_fill(~allowed, torch.finfo(torch.float32).min)}[mask_kind]
    out, probs = observe.decode_attention(query, key, value, mask, scaling=0.3, softcap=softcap)
    k, v = key.repeat_interleave(Hq // Hkv, 1), value.repeat_interleave(Hq // Hkv, 1)
    logits = query @ k.transpose(-1, -2) * 0.3
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if mask is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    expected = logits.softmax(-1)
    assert out.shape == (B, 1, Hq, D) and probs.shape == (B, Hq, 1, P) and probs.dtype == torch.float32
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, (expected @ v).transpose(1, 2), atol=1e-5, rtol=1e-5)
    if mask is not None:
        assert probs[1, ..., :5].abs().max() == 0  # pads get nothing
    # the refusals: prompts (q > 1) and attention variants it does not compute
    assert observe.one_pass(query, {"scaling": 0.3}) and not observe.one_pass(query.expand(B, Hq, 2, D), {})
    assert not observe.one_pass(query, {"sliding_window": 8}) and not observe.one_pass(query, {"dropout": 0.1})
