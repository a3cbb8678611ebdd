"""StaticSlidingWindowKVLayer: the sliding layers of StaticQuantizedKVCache (hybrid models such as Gemma 3) decode like
transformers' StaticSlidingWindowLayer, and compiled decoding is one graph."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import greedy_with_logits, left_padded_prompt, tiny_gemma3
from transformers import CompileConfig

from kvpress_lite import QuantizedKVCache, StaticQuantizedKVCache
from kvpress_lite._compat import StaticSlidingWindowLayer, cache_kwarg, static_passthrough_layer
from kvpress_lite.sliding import StaticSlidingWindowKVLayer

SMALL = dict(bits=4, group_size=16, residual_length=16)  # tiny models: head_dim 16; tiny Gemma 3's window is 8


def _generate(model, cache, ids, mask, new_tokens=32, **kwargs):
    return greedy_with_logits(model, cache, ids, mask, new_tokens, **kwargs)


def _with_transformers_sliding(cache):
    """The same cache with transformers' StaticSlidingWindowLayer at the sliding layers (the host path's reference)."""
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, StaticSlidingWindowKVLayer):
            cache.layers[i] = static_passthrough_layer("sliding_attention", {"sliding_window": layer.sliding_window},
                                                       cache.max_cache_len)
    return cache


@pytest.mark.parametrize("length,pad", [(40, 5), (5, 2)])  # prompt longer than the window (8); shorter, growing past
def test_unfused_equals_transformers_layer_and_quantized_cache(length, pad):
    model = tiny_gemma3()
    ids, mask = left_padded_prompt(length=length, pad=pad)
    cache = StaticQuantizedKVCache(model, max_cache_len=80, **SMALL)
    assert [type(layer).__name__ for layer in cache.layers] == ["StaticSlidingWindowKVLayer"] * 3 + \
        ["StaticQuantizedKVLayer"]
    assert [layer.layer_idx for layer in cache.layers] == [0, 1, 2, 3]
    seq, logits = _generate(model, cache, ids, mask)
    seq_tf, logits_tf = _generate(model, _with_transformers_sliding(
        StaticQuantizedKVCache(model, max_cache_len=80, **SMALL)), ids, mask)
    assert torch.equal(seq, seq_tf) and torch.equal(logits, logits_tf)
    seq_ref, logits_ref = _generate(model, QuantizedKVCache(model, **SMALL), ids, mask)
    assert torch.equal(seq, seq_ref)
    if length > 8:
        assert torch.equal(logits, logits_ref)
    else:  # transformers 5.17's own static sliding layer differs from its dynamic one by ~2e-7 here (5.24: equal)
        torch.testing.assert_close(logits, logits_ref, atol=1e-6, rtol=1e-6)
    layer = cache.layers[0]
    assert int(layer.get_seq_length()) == length + 31 and layer.keys.shape[-2] == 8


@pytest.mark.parametrize("length,pad", [(40, 5), (5, 2)])
def test_fused_step_path_same_tokens(length, pad):
    """fused=True on CPU: the sliding layers' decode steps run the step path (own mask over cat(window, new))."""
    model = tiny_gemma3()
    ids, mask = left_padded_prompt(length=length, pad=pad)
    seq_ref, logits_ref = _generate(model, StaticQuantizedKVCache(model, max_cache_len=80, **SMALL), ids, mask)
    with StaticQuantizedKVCache(model, max_cache_len=80, fused=True, **SMALL) as cache:
        seq, logits = _generate(model, cache, ids, mask)
        assert cache.is_compileable and cache.layers[0]._steps(1)  # decode steps took the step path
        assert cache.layers[0].kv_start.tolist() == [0, pad]  # the prompt's left padding, recorded
    assert torch.equal(seq, seq_ref)
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-5)


def test_compiled_hybrid_decode_is_one_graph():
    """generate's automatic compile (forced on CPU, aot_eager, fullgraph) of tiny Gemma 3: one graph for every decode
    step (a recompile raises) and the uncompiled fused path's greedy tokens."""
    model = tiny_gemma3()
    ids, mask = left_padded_prompt()
    with StaticQuantizedKVCache(model, max_cache_len=80, fused=True, **SMALL) as cache:
        seq_ref, logits_ref = _generate(model, cache, ids, mask)
    config = CompileConfig(backend="aot_eager", fullgraph=True, mode=None, dynamic=False)
    config._compile_all_devices = True  # generate compiles only on accelerators unless told
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        with StaticQuantizedKVCache(model, max_cache_len=80, fused=True, **SMALL) as cache:
            seq, logits = _generate(model, cache, ids, mask, compile_config=config)
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["stats"]["calls_captured"] > 0
    assert torch.equal(seq, seq_ref)
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-5)


def _sdpa(module, query, key, value, mask, **kwargs):
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask), None


@pytest.mark.parametrize("chunked", [False, True])
def test_step_writes_match_host_path_and_attention_is_exact(chunked):
    """The layer alone, W = 8: chunks of 1-5 tokens across the window boundary. The step path (no host read) keeps
    exactly transformers' StaticSlidingWindowLayer's last 8 tokens, and its attention equals a direct sliding-window
    (or chunked: chunks of 8 counted from the first valid token) softmax over every token so far (left padding 3 on
    row 1), also for several tokens with a full window."""
    torch.manual_seed(0)
    w, chunks = 8, [3, 1, 2, 4, 1, 5, 1, 3, 1, 1]
    step = StaticSlidingWindowKVLayer(max_cache_len=100, sliding_window=w, layer_idx=0, chunked=chunked)
    step.attachment, step._bridge_seen = SimpleNamespace(active=True), True  # fused, prompt seen: step path always
    host = StaticSlidingWindowKVLayer(max_cache_len=100, sliding_window=w, layer_idx=0)
    ref = StaticSlidingWindowLayer(max_cache_len=100, sliding_window=w)
    start = torch.tensor([0, 3])
    all_k, all_v, seen = torch.empty(2, 2, 0, 16), torch.empty(2, 2, 0, 16), 0
    for q in chunks:
        k, v, query = torch.randn(2, 2, q, 16), torch.randn(2, 2, q, 16), torch.randn(2, 2, q, 16)
        assert step.get_mask_sizes(q) == (w, 0) and host.get_mask_sizes(q) == ref.get_mask_sizes(q)
        key, value = step.update(k, v)
        if seen == 0:
            step.kv_start.copy_(start)
        out_host, out_ref = host.update(k, v), ref.update(k, v)
        assert torch.equal(out_host[0], out_ref[0]) and torch.equal(out_host[1], out_ref[1])
        assert key.shape[-2] == w + q
        out, _ = step.attend(_sdpa, None, query, key, value, None)
        all_k, all_v = torch.cat([all_k, k], -2), torch.cat([all_v, v], -2)
        seen += q
        n = min(seen, w)
        assert torch.equal(step.keys[:, :, :n], ref.keys[:, :, :n]) and torch.equal(step.values[:, :, :n],
                                                                                   ref.values[:, :, :n])
        assert int(step.get_seq_length()) == int(host.get_seq_length()) == seen
        for b in range(2):
            for i in range(q):
                p = seen - q + i
                first = int(start[b])
                lo = max(first, first + (p - first) // w * w if chunked else p - w + 1)
                if lo > p:
                    continue  # a padding query (row 1, first tokens): no valid key
                expected = torch.nn.functional.scaled_dot_product_attention(
                    query[b : b + 1, :, i : i + 1], all_k[b : b + 1, :, lo : p + 1], all_v[b : b + 1, :, lo : p + 1])
                torch.testing.assert_close(out[b, :, i], expected[0, :, 0], atol=1e-6, rtol=1e-6)
    step.kv_start.fill_(1000)  # every query of both rows sees no key: no NaN
    key, value = step.update(*[torch.randn(2, 2, 2, 16)] * 2)
    assert torch.isfinite(step.attend(_sdpa, None, torch.randn(2, 2, 2, 16), key, value, None)[0]).all()


def test_reset_keeps_buffers_beams_and_bad_input():
    model = tiny_gemma3()
    ids, mask = left_padded_prompt()
    cache = StaticQuantizedKVCache(model, max_cache_len=80, **SMALL)
    first = _generate(model, cache, ids, mask, new_tokens=10)[0]
    layer = cache.layers[0]
    names = ("keys", "values", "seen", "kv_start")
    pointers = [getattr(layer, n).data_ptr() for n in names]
    cache.reset()
    assert int(layer.get_seq_length()) == 0
    assert torch.equal(_generate(model, cache, ids, mask, new_tokens=10)[0], first)
    assert pointers == [getattr(layer, n).data_ptr() for n in names]
    beam = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, num_beams=3, do_sample=False)
    beams_ref = model.generate(**beam, **{cache_kwarg(model): QuantizedKVCache(model, **SMALL)})
    beams = model.generate(**beam, **{cache_kwarg(model): StaticQuantizedKVCache(model, max_cache_len=80, **SMALL)})
    assert torch.equal(beams, beams_ref)
    with pytest.raises(ValueError, match="fixed batch size"):
        layer.batch_select_indices(torch.tensor([0]))
    with pytest.raises(ValueError, match="cannot be cropped"):
        layer.crop(-1)
    cache.reset()
    with pytest.raises(ValueError, match="allocated for batch 2"):
        _generate(model, cache, ids[:1], mask[:1], new_tokens=2)
    with StaticQuantizedKVCache(model, max_cache_len=80, fused=True, **SMALL) as fused, \
            pytest.raises(ValueError, match="sliding layer 0.*left padding only"):
        _generate(model, fused, ids, mask.flip(-1), new_tokens=2)  # right padding
