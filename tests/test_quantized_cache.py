"""QuantizedKVCache: layer invariants (model-free), exactness, memory and generate on real models."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gemma3, tiny_llama
from transformers import DeepseekV3Config, DynamicCache, Qwen3NextConfig

from kvpress_lite import QuantizedKVCache, build_cache, cache_nbytes
from kvpress_lite._compat import DynamicSlidingWindowLayer, cache_kwarg
from kvpress_lite.quant import QuantizedKVLayer


# ---------------------------------------------------------------- layer, model-free
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_layer_keeps_recent_window_exact_and_quantizes_blocks_once(bits):
    torch.manual_seed(0)
    layer = QuantizedKVLayer(bits=bits, group_size=8, residual_length=4)
    keys, values = torch.randn(2, 4, 45, 16), torch.randn(2, 4, 45, 16)
    seen = 0
    for chunk in (13, 1, 1, 7, 1, 22):  # odd chunk sizes, prefill then decode-like steps
        k_out, v_out = layer.update(keys[:, :, seen : seen + chunk], values[:, :, seen : seen + chunk])
        seen += chunk
        assert k_out.shape == (2, 4, seen, 16) and layer.get_seq_length() == seen
        assert layer.get_mask_sizes(1) == (seen + 1, 0)
        residual = layer.store.keys.shape[-2]
        assert residual == seen if seen < 4 + 8 else 4 <= residual < 4 + 8
        assert layer.quantized_length % 8 == 0 and layer.quantized_length + residual == seen
        # the residual is stored exactly, and the returned states cover the whole history in order
        assert torch.equal(layer.store.keys, keys[:, :, seen - residual : seen])
        tol = {8: 0.05, 4: 0.8, 2: 3.0}[bits]
        assert (k_out - keys[:, :, :seen]).abs().max() < tol
        assert (v_out - values[:, :, :seen]).abs().max() < tol
    first_block = layer.store.key_codes[:, :, :8].clone()
    layer.update(keys[:, :, :16], values[:, :, :16])
    assert torch.equal(layer.store.key_codes[:, :, :8], first_block)  # old blocks are never re-quantized


def test_layer_nbytes_match_kivi_arithmetic():
    layer = QuantizedKVLayer(bits=4, group_size=64, residual_length=128)
    layer.update(torch.randn(1, 3, 4096, 64, dtype=torch.bfloat16), torch.randn(1, 3, 4096, 64, dtype=torch.bfloat16))
    from kvpress_lite.kernels.layouts import token_packed_nbytes

    elems, t = 3 * 64, 3968
    codes = t * elems // 2 + token_packed_nbytes(1, 3, 64, t, 4)  # keys [T, D/2]; values token-packed (1984 B aligned)
    expected = codes + 2 * t * elems * 4 // 64 + 2 * 128 * elems * 2  # + scales, zeros (bf16), the window
    assert cache_nbytes(layer) == expected


def test_layer_reorder_reset_and_crop():
    layer = QuantizedKVLayer(bits=8, group_size=4, residual_length=2)
    keys = torch.randn(3, 2, 11, 8)
    layer.update(keys, keys)
    before, _ = layer.update(torch.zeros(3, 2, 0, 8), torch.zeros(3, 2, 0, 8))
    layer.reorder_cache(torch.tensor([2, 0, 1]))
    after, _ = layer.update(torch.zeros(3, 2, 0, 8), torch.zeros(3, 2, 0, 8))
    assert torch.equal(after, before[[2, 0, 1]])
    layer.crop(-1)
    assert layer.get_seq_length() == 10
    with pytest.raises(ValueError, match="quantized blocks cannot be rolled back"):
        layer.crop(-9)
    layer.reset()
    assert layer.get_seq_length() == 0 and cache_nbytes(layer) == 0


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 3}, r"bits=3 .*accepted values: \[2, 4, 8\] \(use the `dynamic` strategy"),  # no "or None"
        ({"bits": None}, r"bits=None .*accepted values: \[2, 4, 8\]"),
        ({"bits": 16}, "bits=16"),
        ({"group_size": 24}, r"group_size=24 must divide head_dim=16.*accepted values: \[1, 2, 4, 8, 16\]"),
        ({"group_size": 0}, "group_size=0"),
        ({"residual_length": -1}, "residual_length=-1"),
    ],
)
def test_bad_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizedKVCache(tiny_llama().config, **kwargs)


def test_unsupported_models_raise():
    with pytest.raises(ValueError, match="multi-head latent attention"):
        QuantizedKVCache(DeepseekV3Config())
    with pytest.raises(ValueError, match=r"linear_attention.*Supported `layer_types`"):
        QuantizedKVCache(Qwen3NextConfig())
    with pytest.raises(ValueError, match="config"):
        QuantizedKVCache("llama")


# ---------------------------------------------------------------- tiny models
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_no_quantization_gives_dynamic_logits(attn):
    """With the residual window longer than the sequence nothing is quantized: logits match DynamicCache."""
    model = tiny_llama(attn)
    ids = torch.randint(0, 128, (2, 20))
    key = cache_kwarg(model)
    ref = model(ids, **{key: DynamicCache(config=model.config)}).logits
    out = model(ids, **{key: QuantizedKVCache(model.config, bits=4, group_size=16, residual_length=64)}).logits
    assert torch.equal(out, ref)


def test_hybrid_model_quantizes_only_full_attention_layers():
    model = tiny_gemma3()
    cache = QuantizedKVCache(model.config, bits=4, group_size=8, residual_length=4)
    kinds = [type(layer) for layer in cache.layers]
    assert kinds == [DynamicSlidingWindowLayer] * 3 + [QuantizedKVLayer]
    out = model.generate(torch.randint(0, 128, (2, 30)), max_new_tokens=6, do_sample=False,
                         **{cache_kwarg(model): cache})
    assert out.shape == (2, 36)
    assert cache.layers[3].quantized_length == 24 and cache.layers[0].keys.shape[-2] < 10


def test_registry_builds_quantized_cache():
    cache = build_cache("quantized", tiny_llama(), bits=8, group_size=16)
    assert isinstance(cache, QuantizedKVCache) and cache.bits == 8
    with pytest.raises(ValueError, match="unknown parameter"):
        build_cache("quantized", tiny_llama(), nbits=8)


# ---------------------------------------------------------------- real models
@pytest.mark.model
def test_smollm2_memory_at_4096_tokens(smollm2):
    """bf16, 4096 cached tokens: int8 >= 1.8x and int4 >= 3.2x smaller than DynamicCache (G=64, R=128)."""
    model, _ = smollm2
    ids = torch.randint(100, 20000, (1, 4096))
    nbytes = {}
    for label, cache in [
        ("dynamic", DynamicCache(config=model.config)),
        ("int8", QuantizedKVCache(model.config, bits=8)),
        ("int4", QuantizedKVCache(model.config, bits=4)),
    ]:
        with torch.no_grad():
            model(ids, use_cache=True, **{cache_kwarg(model): cache})
        assert cache.get_seq_length() == 4096
        nbytes[label] = cache_nbytes(cache)
    assert nbytes["dynamic"] == 2 * 30 * 3 * 64 * 4096 * 2  # 2 (K,V) x layers x kv_heads x head_dim x tokens x bf16
    assert nbytes["dynamic"] / nbytes["int8"] >= 1.8
    assert nbytes["dynamic"] / nbytes["int4"] >= 3.2


def _prompts(tokenizer, n):
    from eval.text_sources import pydoc_text

    text = pydoc_text()
    return [text[20000 + 3000 * i : 20000 + 3000 * i + 1500] + "\n\nIn summary," for i in range(n)]


@pytest.mark.model
def test_smollm2_generate_batch_continuation_and_reset(smollm2):
    """Left-padded batch, a second generate continuing the same cache, reset. (Beam search and seeded sampling equal
    DynamicCache's when nothing is compressed: tests/test_registry.py.)"""
    model, tok = smollm2
    key = cache_kwarg(model)
    tok.padding_side = "left"
    inputs = tok(_prompts(tok, 2), return_tensors="pt", padding=True)
    inputs["input_ids"][1, :5] = tok.pad_token_id  # make sure row 1 is left-padded
    inputs["attention_mask"][1, :5] = 0
    prompt_len = inputs["input_ids"].shape[1]

    cache = QuantizedKVCache(model, bits=4, group_size=32, residual_length=32)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False, **{key: cache})
    assert out.shape == (2, prompt_len + 8) and cache.get_seq_length() == prompt_len + 7
    assert cache.layers[0].quantized_length > 0
    # continuation: a second generate call on the same cache extends it
    mask = torch.cat([inputs["attention_mask"], torch.ones(2, 8, dtype=torch.long)], dim=1)
    out2 = model.generate(input_ids=out, attention_mask=mask, max_new_tokens=5, do_sample=False, **{key: cache})
    assert out2.shape == (2, prompt_len + 13) and torch.equal(out2[:, : prompt_len + 8], out)
    assert cache.get_seq_length() == prompt_len + 12
    cache.reset()
    assert cache.get_seq_length() == 0


@pytest.mark.model
def test_smollm2_int8_greedy_matches_dynamic(smollm2_fp32):
    """int8 (G=64, R=32: most of each ~370-token prompt quantized) generates DynamicCache's tokens, fp32.

    In bf16 even eager vs SDPA attention diverge on most of these prompts (see docs/results.md), so fp32 is used.
    """
    model, tok = smollm2_fp32
    matches = 0
    for prompt in _prompts(tok, 4):
        inputs = tok(prompt, return_tensors="pt")
        ref = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        cache = QuantizedKVCache(model.config, bits=8, group_size=64, residual_length=32)
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False, **{cache_kwarg(model): cache})
        assert cache.layers[0].quantized_length >= 256
        matches += torch.equal(out, ref)
    assert matches >= 3


@pytest.mark.model
def test_gemma3_long_prompt_beyond_sliding_window_matches_dynamic(gemma3):
    """Gemma 3 (fp32), a prompt longer than the 512-token sliding window: only full-attention layers quantize; int8
    generates DynamicCache's greedy tokens and int4's first next-token distribution is within 0.05 (total variation)
    of DynamicCache's."""
    model, tok = gemma3
    key = cache_kwarg(model)
    inputs = tok(_prompts(tok, 2)[0] * 2, return_tensors="pt")
    assert inputs["input_ids"].shape[1] > model.config.sliding_window
    ref = model.generate(**inputs, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    full = [i for i, t in enumerate(model.config.layer_types) if t == "full_attention"]
    for bits in (8, 4):
        cache = QuantizedKVCache(model, bits=bits)
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, **{key: cache})
        assert all(isinstance(cache.layers[i], QuantizedKVLayer) for i in full)
        assert cache.layers[full[0]].quantized_length > 0
        p, q = ref.logits[0].softmax(-1), out.logits[0].softmax(-1)
        total_variation = 0.5 * (p - q).abs().sum().item()
        if bits == 8:
            assert torch.equal(out.sequences, ref.sequences)
        assert total_variation <= 0.05, (bits, total_variation)


def test_a_generation_length_gives_the_compileable_cache():
    """`QuantizedKVCache(model, bits=4, max_new_tokens=N)` is the preallocated `StaticQuantizedKVCache` (one class for
    users): `generate` compiles its decode step (forced on CPU: aot_eager, fullgraph, one graph, a recompile raises)
    and decodes the tokens of the growing, uncompiled `QuantizedKVCache(model, bits=4)`."""
    from conftest import greedy_with_logits, left_padded_prompt
    from transformers import CompileConfig

    from kvpress_lite import StaticQuantizedKVCache

    model = tiny_llama()
    ids, mask = left_padded_prompt()
    kw = dict(bits=4, group_size=16, residual_length=16)
    growing = QuantizedKVCache(model, **kw)
    assert type(growing) is QuantizedKVCache and not growing.is_compileable
    seq_ref, logits_ref = greedy_with_logits(model, growing, ids, mask, 30)
    config = CompileConfig(backend="aot_eager", fullgraph=True, mode=None)
    config._compile_all_devices = True  # generate compiles only on accelerators unless told
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        with QuantizedKVCache(model, **kw, max_new_tokens=30, fused=True) as cache:
            assert isinstance(cache, StaticQuantizedKVCache) and cache.is_compileable
            seq, logits = greedy_with_logits(model, cache, ids, mask, 30, compile_config=config)
            assert cache.max_cache_len == ids.shape[1] + 30
    torch._dynamo.reset()
    assert torch.equal(seq, seq_ref)
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-5)
    static = QuantizedKVCache(model.config, 8, 16, 16, max_cache_len=64)  # positional arguments keep their meaning
    assert isinstance(static, StaticQuantizedKVCache) and (static.bits, static.group_size, static.max_cache_len) == \
        (8, 16, 64)
