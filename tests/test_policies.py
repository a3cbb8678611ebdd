"""The leading policies' scores against references computed from eager attention on tiny models: Expected Attention
(queries' statistics, no attention weights) and KVzip (the largest attention from a re-read of the context)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_gemma3, tiny_llama
from transformers import DynamicCache

from kvpress_lite import EvictionCache
from kvpress_lite._compat import cache_kwarg
from kvpress_lite.eviction import EvictionLayer, ScoreInputs, make_policy
from kvpress_lite.eviction.reread import reread

TINY = {"llama": tiny_llama, "gemma3": tiny_gemma3}


def prompt(length: int = 24, seed: int = 0, batch: int = 2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=gen)


def full_layers(cache) -> list[tuple[int, EvictionLayer]]:
    return [(i, layer) for i, layer in enumerate(cache.layers) if isinstance(layer, EvictionLayer)]


def kept_inputs(layer: EvictionLayer) -> ScoreInputs:
    keys, values = layer.store.read()
    return ScoreInputs(keys, values, layer.positions, length=layer.length, queries=layer.queries)


# ------------------------------------------------------------------------------------------- Expected Attention


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_expected_attention_without_rope_shift_is_the_last_querys_eager_attention(arch):
    """window=1, no covariance, no value norm and no RoPE shift: the expected attention is the attention the last
    query really paid (eager weights), averaged over the query heads of each kv head."""
    model = TINY[arch]("eager")
    ids = prompt()
    ref = model(ids, output_attentions=True, **{cache_kwarg(model): DynamicCache(config=model.config)}).attentions
    with EvictionCache(model, policy="expected_attention", budget=64, window=1, use_covariance=False,
                       use_vnorm=False) as cache:
        model(ids, **{cache_kwarg(model): cache})
    cache.policy._inv_freq = None  # no RoPE shift: the last query as it is
    for i, layer in full_layers(cache):
        ours = cache.policy.score(kept_inputs(layer))  # (B, Hkv, L)
        Hkv = ours.shape[1]
        expected = ref[i][:, :, -1].float().view(2, Hkv, -1, ids.shape[1]).mean(2)
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)


def rope_matrix(model, shift: int, head_dim: int) -> torch.Tensor:
    """`[D, D]` rotation of transformers' RoPE by `shift` positions, from the model's own cos/sin."""
    decoder = model.get_decoder()
    x = torch.zeros(1, 1, head_dim)
    pos = torch.tensor([[shift]])
    if hasattr(decoder.rotary_emb, "full_attention_inv_freq"):  # Gemma 3: one RoPE per layer type
        cos, sin = decoder.rotary_emb(x, pos, "full_attention")
    else:
        cos, sin = decoder.rotary_emb(x, pos)
    cos, sin = cos[0, 0].float(), sin[0, 0].float()  # (D,)
    half = head_dim // 2
    rotate_half = torch.zeros(head_dim, head_dim)  # rotate_half(x) = [-x2, x1]
    rotate_half[:half, half:] = -torch.eye(half)
    rotate_half[half:, :half] = torch.eye(half)
    return torch.diag(cos) + torch.diag(sin) @ rotate_half


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_expected_attention_matches_an_explicit_gaussian_reference(arch):
    """Reference written independently: each kept query rotated by the model's own RoPE matrices to every future
    position and averaged, torch.cov for Sigma, the Gaussian moment formula, softmax, group mean, value norm."""
    model = TINY[arch]("eager")
    ids = prompt(length=20)
    window, n_future = 6, 5
    with EvictionCache(model, policy="expected_attention", budget=64, window=window, n_future=n_future) as cache:
        model(ids, **{cache_kwarg(model): cache})
    scale = next(m.scaling for m in model.modules() if hasattr(m, "scaling") and hasattr(m, "layer_idx"))
    for _, layer in full_layers(cache):
        inputs = kept_inputs(layer)
        ours = cache.policy.score(inputs)
        queries, keys, values = inputs.queries.float(), inputs.keys.float(), inputs.values.float()
        B, Hq, w, D = queries.shape
        Hkv, G = keys.shape[1], Hq // keys.shape[1]
        rotations = torch.stack([
            torch.stack([rope_matrix(model, w - i + j, D) for j in range(n_future)]).mean(0) for i in range(w)
        ])  # (w, D, D)
        future = torch.einsum("ide,bhie->bhid", rotations, queries)
        expected = torch.empty(B, Hkv, keys.shape[2])
        for b in range(B):
            per_head = []
            for h in range(Hq):
                mu, sigma = future[b, h].mean(0), torch.cov(future[b, h].T, correction=0)
                k = keys[b, h // G]
                logits = k @ mu * scale + torch.einsum("pd,de,pe->p", k, sigma, k) * scale**2 / 2
                per_head.append(logits.softmax(-1))
            expected[b] = torch.stack(per_head).view(Hkv, G, -1).mean(1) * values[b].norm(dim=-1)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def test_expected_attention_runs_under_sdpa_and_evicts_by_its_scores():
    model = tiny_llama("sdpa")
    ids = prompt(length=30)
    with EvictionCache(model, policy="expected_attention", budget=10, sinks=0, recent=0, slack=0) as cache:
        ref = DynamicCache(config=model.config)
        model(ids, **{cache_kwarg(model): ref})
        model(ids, **{cache_kwarg(model): cache})
        assert all(layer.physical_length == 10 for _, layer in full_layers(cache))
        assert all(layer.queries is None for _, layer in full_layers(cache))  # dropped by the eviction
    # the kept slots are the top 10 of the policy's scores on the full prompt (computed again on DynamicCache's keys)
    with EvictionCache(model, policy="expected_attention", budget=64) as full:
        model(ids, **{cache_kwarg(model): full})
    for i, layer in full_layers(full):
        top = full.policy.score(kept_inputs(layer)).topk(10, dim=-1).indices.sort(-1).values
        assert torch.equal(cache.layers[i].positions.long(), top)


def test_expected_attention_bad_input():
    for kwargs, match in [({"window": 0}, "window=0"), ({"n_future": -1}, "n_future=-1"),
                          ({"use_covariance": 1}, "use_covariance=1"), ({"epsilon": -1.0}, "epsilon=-1.0")]:
        with pytest.raises(ValueError, match=match):
            make_policy("expected_attention", **kwargs)


def test_expected_attention_is_scored_per_head_for_adaptive_budgets():
    assert make_policy("expected_attention").per_head and not make_policy("tova").per_head
    assert math.isfinite(make_policy("expected_attention").n_future)


# ------------------------------------------------------------------------------------------------------- KVzip


def left_padded(length: int = 24, pad: int = 5):
    ids = prompt(length)
    mask = torch.ones_like(ids)
    ids[1, :pad], mask[1, :pad] = 0, 0
    return ids, mask


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("chunk_size", [64, 7])
def test_kvzip_scores_are_the_largest_eager_attention_of_the_reread(arch, chunk_size):
    """Reference: DynamicCache holding the prompt, then each chunk of the prompt fed again (positions continuing the
    row's real tokens) with eager `output_attentions`; a prompt token's score is the largest probability any real
    re-read query and any query head of its kv head gives it."""
    model = TINY[arch]("eager")
    ids, mask = left_padded()
    B, L = ids.shape
    types = getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    Hkv = model.config.num_key_value_heads
    expected = {i: torch.zeros(B, Hkv, L) for i in full}
    for start in range(0, L, chunk_size):
        stop = min(start + chunk_size, L)
        dyn = DynamicCache(config=model.config)
        model(input_ids=ids, attention_mask=mask, **{cache_kwarg(model): dyn})
        chunk_mask = mask[:, start:stop]
        positions = mask.sum(1, keepdim=True) + (chunk_mask.cumsum(1) - 1).clamp(min=0)
        out = model(input_ids=ids[:, start:stop], attention_mask=torch.cat([mask, chunk_mask], 1),
                    position_ids=positions, output_attentions=True, **{cache_kwarg(model): dyn})
        for i in full:
            att = out.attentions[i][..., :L].float()  # (B, Hq, q, L)
            att = att * chunk_mask[:, None, :, None]  # pad queries give nothing
            att = att.view(B, Hkv, -1, stop - start, L).amax(dim=(2, 3))
            expected[i] = torch.maximum(expected[i], att)
    with EvictionCache(model, policy="kvzip", budget=64, chunk_size=chunk_size) as cache:
        model(input_ids=ids, attention_mask=mask, **{cache_kwarg(model): cache})  # the prompt (nothing evicted)
        reread(model, cache, ids, mask, chunk_size)  # what the hook runs before the first decoding forward
        for i in full:
            torch.testing.assert_close(cache.layers[i].scores[..., :L], expected[i], atol=1e-6, rtol=1e-5)


def test_kvzip_keeps_the_whole_prompt_until_the_reread_then_evicts_its_top_scores():
    model = tiny_llama("sdpa")
    ids, mask = left_padded(length=30, pad=4)
    seen = []
    with EvictionCache(model, policy="kvzip", budget=10, sinks=1, recent=2, slack=0, chunk_size=8,
                       layerwise=True) as cache:
        hook = model.register_forward_hook(lambda *_: seen.append(cache.layers[0].physical_length))
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                             pad_token_id=0, **{cache_kwarg(model): cache})
        hook.remove()
        assert seen[0] == 30  # the prompt forward evicts nothing
        assert seen[-1] == 10 and out.shape == (2, 33)
        layer = cache.layers[0]
        assert (layer.positions[1] >= 4).all()  # pads went first
    # the hook is gone after detach: the model runs a DynamicCache as before
    assert not model._forward_pre_hooks


def test_kvzip_layerwise_false_ranks_all_layers_together():
    """One ranking across layers (KVzip's non-uniform budgets): the same total, the slots going to the layer whose
    scores are higher; each layer then keeps exactly its budget of its top scores, for the rest of generation."""
    from kvpress_lite.eviction.reread import layer_budgets

    model = tiny_llama("sdpa")
    ids = prompt(length=40, batch=1)
    with EvictionCache(model, policy="kvzip", budget=12, sinks=1, recent=2, slack=0, layerwise=False) as cache:
        model(input_ids=ids, **{cache_kwarg(model): cache})
        (_, first), (_, second) = full_layers(cache)
        high, low = torch.rand(1, 2, 40) + 1.0, torch.rand(1, 2, 40) * 0.1  # layer 0's scores all above layer 1's
        assert layer_budgets([first, second], [high, low]) == [21, 3]  # 24 slots: layer 1 keeps only sinks + recent
        assert layer_budgets([first, second], [low, high]) == [3, 21]
    with EvictionCache(model, policy="kvzip", budget=12, sinks=1, recent=2, slack=0, layerwise=False) as cache:
        out = model.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                             **{cache_kwarg(model): cache})
        (_, first), (_, second) = full_layers(cache)
        budgets = [first.budget, second.budget]
        assert out.shape == (1, 44) and sum(budgets) <= 24 and budgets != [12, 12]
        assert [first.physical_length, second.physical_length] == budgets


def test_kvzip_bad_input_and_adaptive_refusal():
    with pytest.raises(ValueError, match="chunk_size=0"):
        make_policy("kvzip", chunk_size=0)
    with pytest.raises(ValueError, match="layerwise=1"):
        make_policy("kvzip", layerwise=1)
    with pytest.raises(ValueError, match=r"adaptive=True does not support policy='kvzip'"):
        EvictionCache(tiny_llama(), policy="kvzip", budget=32, adaptive=True)


@pytest.mark.parametrize("policy", ["expected_attention", "kvzip"])
def test_leading_policies_run_quantized_and_batched(policy):
    model = tiny_llama("sdpa")
    ids, mask = left_padded(length=40, pad=6)
    with EvictionCache(model, policy=policy, budget=12, sinks=1, recent=2, slack=0, bits=4, group_size=16,
                       residual_length=4) as cache:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                             pad_token_id=0, return_dict_in_generate=True, output_logits=True,
                             **{cache_kwarg(model): cache})
        assert torch.isfinite(torch.stack(out.logits)).all()
        lengths = [layer.physical_length for _, layer in full_layers(cache)]
        assert sum(lengths) <= 12 * len(lengths)  # kvzip: one ranking across layers, the same total
        assert max(lengths) <= 12 or policy == "kvzip"
        assert all(layer.store.quantized_length > 0 for _, layer in full_layers(cache))


def test_heavy_hitter_cache_forwards_every_eviction_cache_keyword():
    from kvpress_lite import HeavyHitterCache
    from kvpress_lite.eviction import AdaptiveEvictionLayer

    model = tiny_llama()
    with HeavyHitterCache(model, budget=32, fused=False, kernel_impl="torch", average=True, adaptive=True) as cache:
        assert cache.policy.name == "h2o" and cache.policy.average
        assert isinstance(cache.layers[0], AdaptiveEvictionLayer)
    with pytest.raises(ValueError, match="kernel_impl"):
        HeavyHitterCache(model, budget=32, kernel_impl="cuda-magic")
    with pytest.raises(ValueError, match="HeavyHitterCache always uses policy='h2o'"):
        HeavyHitterCache(model, budget=32, policy="snapkv")
