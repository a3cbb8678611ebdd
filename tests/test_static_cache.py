"""StaticQuantizedKVCache: same tensors as QuantizedKVCache, fused decode over valid lengths, compiled decode steps."""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

import pytest
import torch
from conftest import greedy_with_logits, left_padded_prompt, tiny_gemma3, tiny_llama
from interpreted import interpreted_json
from transformers import CompileConfig

from kvpress_lite import QuantizedKVCache, StaticQuantizedKVCache, build_cache, cache_nbytes
from kvpress_lite._compat import cache_kwarg

SMALL = dict(bits=4, group_size=16, residual_length=16)  # tiny models: head_dim 16


def _generate(model, cache, ids, mask, new_tokens=60, **kwargs):
    return greedy_with_logits(model, cache, ids, mask, new_tokens, **kwargs)


def _compile_config(backend="aot_eager"):
    config = CompileConfig(backend=backend, fullgraph=True, mode=None, dynamic=False)
    config._compile_all_devices = True  # generate compiles only on accelerators unless told
    return config


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_unfused_matches_quantized_cache_exactly(bits):
    """CPU, uncompiled: the static cache returns the same tensors as QuantizedKVCache (bit-identical logits), across
    several flushes (60 new tokens with G = 16)."""
    model = tiny_llama()
    ids, mask = left_padded_prompt()
    kw = dict(SMALL, bits=bits)
    seq_ref, logits_ref = _generate(model, QuantizedKVCache(model, **kw), ids, mask)
    cache = StaticQuantizedKVCache(model, max_cache_len=100, **kw)
    assert not cache.fused and not cache.is_compileable
    seq, logits = _generate(model, cache, ids, mask)
    assert torch.equal(seq, seq_ref)
    assert torch.equal(logits, logits_ref)
    t, r = cache.layers[0].store.lengths.tolist()
    assert t + r == 40 + 59 and t % 16 == 0 and 16 <= r < 32  # KIVI schedule: residual in [R, R + G)


def test_fused_step_path_matches_unfused():
    """fused=True on CPU: decode steps write in place and run the op's reference over the valid lengths."""
    model = tiny_llama()
    ids, mask = left_padded_prompt()
    seq_ref, logits_ref = _generate(model, StaticQuantizedKVCache(model, max_cache_len=100, **SMALL), ids, mask)
    with StaticQuantizedKVCache(model, max_cache_len=100, fused=True, **SMALL) as cache:
        assert cache.fused and cache.is_compileable
        seq, logits = _generate(model, cache, ids, mask)
    assert torch.equal(seq, seq_ref)
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-5)
    assert model.config._attn_implementation == "sdpa"  # leaving `with` restored the model


def test_compiled_decode_is_one_graph_and_matches_uncompiled():
    """generate's automatic compile (forced on CPU, aot_eager, fullgraph): one graph for every decode step (a recompile
    raises), greedy outputs identical to the uncompiled fused path in fp32."""
    model = tiny_llama()
    ids, mask = left_padded_prompt()
    with StaticQuantizedKVCache(model, max_cache_len=100, fused=True, **SMALL) as cache:
        seq_ref, logits_ref = _generate(model, cache, ids, mask)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        with StaticQuantizedKVCache(model, max_cache_len=100, fused=True, **SMALL) as cache:
            seq, logits = _generate(model, cache, ids, mask, compile_config=_compile_config())
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["stats"]["calls_captured"] > 0
    assert torch.equal(seq, seq_ref)
    torch.testing.assert_close(logits, logits_ref, atol=1e-6, rtol=1e-6)


def test_compiling_two_bit_widths_in_one_process():
    """int4, then int8, then int4 compiled by generate in one process (its default `dynamic=None`, as on CUDA): the
    same tokens as the eager path each time, and dynamo never makes `bits` or `group_size` symbolic. (Before the fix,
    the int8 recompile marked `store.bits` dynamic by automatic dynamic shapes: torch 2.11 on CUDA then failed with
    `failed to eval lshift(1, s13)` in kivi; torch 2.13 specializes it again and passes, so the log is checked.)"""
    import logging

    model = tiny_llama()
    ids, mask = left_padded_prompt()
    config = _compile_config()
    config.dynamic = None
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    torch._dynamo.reset()
    torch._logging.set_logs(dynamic=logging.INFO)
    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")  # "marking <source> as dynamic (...)"
    logger.addHandler(handler)
    try:
        for bits in (4, 8, 4):
            kw = dict(bits=bits, group_size=16, residual_length=16, max_cache_len=100, fused=True)
            with StaticQuantizedKVCache(model, **kw) as cache:
                seq_ref, _ = _generate(model, cache, ids, mask, new_tokens=20)
            with StaticQuantizedKVCache(model, **kw) as cache:
                seq, _ = _generate(model, cache, ids, mask, new_tokens=20, compile_config=config)
            assert torch.equal(seq, seq_ref), bits
    finally:
        logger.removeHandler(handler)
        torch._logging.set_logs()
        torch._dynamo.reset()
    assert any("as dynamic" in r for r in records), "the probe saw no automatic-dynamic decision at all"
    symbolic = [r for r in records if "as dynamic" in r and ("bits" in r or "group_size" in r)]
    assert not symbolic, symbolic


def _interpreted_triton_run() -> dict:
    """In a process with TRITON_INTERPRET=1: greedy tokens of the step path through the Triton kernel (interpreted on
    CPU tensors), uncompiled and compiled by generate (one graph), against the op's torch reference."""
    torch.set_num_threads(1)
    model = tiny_llama()
    ids, mask = left_padded_prompt()
    result = {}
    for name, impl, compiled in (("torch", "torch", False), ("triton", "triton", True)):
        torch._dynamo.reset()
        extra = {"compile_config": _compile_config()} if compiled else {}
        with torch._dynamo.config.patch(error_on_recompile=True):
            with StaticQuantizedKVCache(model, max_cache_len=80, fused=True, kernel_impl=impl, **SMALL) as cache:
                seq, logits = _generate(model, cache, ids, mask, new_tokens=12, **extra)
        result[name] = {"tokens": seq.tolist(), "logits": logits.flatten()[:4096].tolist()}
    return result


def test_step_path_through_interpreted_triton_kernel_compiled():
    """The GPU code path (Triton kernel with valid lengths read on the device) end to end on the CPU: compiled through
    generate with the kernel interpreted, the same tokens as the torch reference (a flush happens at step 8)."""
    result = interpreted_json(__file__)
    assert result["triton"]["tokens"] == result["torch"]["tokens"]
    torch.testing.assert_close(torch.tensor(result["triton"]["logits"]), torch.tensor(result["torch"]["logits"]),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor's CPU backend needs a C++ compiler")
def test_inductor_writes_the_history_in_place():
    """The compiled step must not copy the preallocated history: inductor's code for a decode step (CPU backend) holds
    no loop over a whole codes buffer. With the flush after the attention, inductor copied every history buffer every
    step (O(max_cache_len) per token) to keep the attention's input intact."""
    from torch._inductor.utils import run_and_get_code

    model = tiny_llama(num_layers=1, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    config = _compile_config("inductor")
    torch._dynamo.reset()
    with StaticQuantizedKVCache(model, bits=4, group_size=64, residual_length=64, max_cache_len=4096,
                                fused=True) as cache:
        _, code = run_and_get_code(lambda: _generate(model, cache, ids, torch.ones_like(ids), new_tokens=3,
                                                     compile_config=config))
        codes_numel = cache.layers[0].store.key_codes.numel()  # 1 x 2 x 4160 x 32 bytes
    code = "\n".join(code)
    assert "index_copy" in code or "index_put" in code  # the step's writes are in this code
    assert f"{codes_numel}L" not in code and f"{codes_numel})" not in code


def test_hybrid_model_unfused_and_fused():
    """Gemma 3 (sliding + full layers): sliding layers are transformers' static ones; both paths decode the same."""
    model = tiny_gemma3()
    ids, mask = left_padded_prompt()
    seq_ref, logits_ref = _generate(model, QuantizedKVCache(model, **SMALL), ids, mask, new_tokens=30)
    seq, logits = _generate(model, StaticQuantizedKVCache(model, max_cache_len=80, **SMALL), ids, mask, new_tokens=30)
    assert torch.equal(seq, seq_ref) and torch.equal(logits, logits_ref)
    with StaticQuantizedKVCache(model, max_cache_len=80, fused=True, **SMALL) as cache:
        seq, logits = _generate(model, cache, ids, mask, new_tokens=30)
    assert torch.equal(seq, seq_ref)
    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_max_cache_len_overflow_raises_naming_it(fused):
    model = tiny_llama()
    ids, mask = left_padded_prompt()
    cache = StaticQuantizedKVCache(model, max_cache_len=60, fused=fused, **SMALL)
    error = ValueError if not fused else RuntimeError  # the step path fails a device assertion (no host sync)
    with cache, pytest.raises(error, match="max_cache_len=60 exceeded"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, do_sample=False,
                       **{cache_kwarg(model): cache})
    with pytest.raises(ValueError, match="max_cache_len=30 exceeded"):  # the prompt alone does not fit
        model(input_ids=ids, attention_mask=mask,
              **{cache_kwarg(model): StaticQuantizedKVCache(model, max_cache_len=30, **SMALL)})


def test_reset_keeps_buffers_and_beam_search_reorders_in_place():
    model = tiny_llama()
    ids, mask = left_padded_prompt()
    cache = StaticQuantizedKVCache(model, max_cache_len=100, **SMALL)
    first = _generate(model, cache, ids, mask, new_tokens=20)[0]
    store = cache.layers[0].store
    pointers = [getattr(store, n).data_ptr() for n in store.state_names]
    cache.reset()
    assert int(cache.get_seq_length()) == 0
    assert torch.equal(_generate(model, cache, ids, mask, new_tokens=20)[0], first)
    assert pointers == [getattr(store, n).data_ptr() for n in store.state_names]
    beam = dict(input_ids=ids, attention_mask=mask, max_new_tokens=20, num_beams=3, do_sample=False)
    beams_ref = model.generate(**beam, **{cache_kwarg(model): QuantizedKVCache(model, **SMALL)})
    beams = model.generate(**beam, **{cache_kwarg(model): StaticQuantizedKVCache(model, max_cache_len=80, **SMALL)})
    assert torch.equal(beams, beams_ref)


def test_max_new_tokens_sizes_the_cache_at_its_firstleft_padded_prompt():
    """max_new_tokens instead of max_cache_len: sized to the first prompt + max_new_tokens, the same tokens as a cache
    given that length; after reset() a prompt that fits keeps the buffers, a longer one re-sizes."""
    model = tiny_llama()
    ids, mask = left_padded_prompt()
    expected = _generate(model, StaticQuantizedKVCache(model, max_cache_len=40 + 30, **SMALL), ids, mask, 30)
    cache = StaticQuantizedKVCache(model, max_new_tokens=30, **SMALL)
    assert cache.max_cache_len is None
    got = _generate(model, cache, ids, mask, 30)
    assert cache.max_cache_len == 70 and cache.layers[0].store.max_cache_len == 70
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    pointer = cache.layers[0].store.key_codes.data_ptr()
    cache.reset()
    _generate(model, cache, ids[:, :30], mask[:, :30], 30)  # 30 + 30 fits in 70: same buffers
    assert cache.max_cache_len == 70 and cache.layers[0].store.key_codes.data_ptr() == pointer
    cache.reset()
    longer = torch.cat([ids, ids], dim=1)
    _generate(model, cache, longer, torch.cat([mask, torch.ones_like(mask)], dim=1), 30)
    assert cache.max_cache_len == 110
    with StaticQuantizedKVCache(model, max_new_tokens=30, fused=True, **SMALL) as fused:
        assert torch.equal(_generate(model, fused, ids, mask, 30)[0], expected[0])


def test_bad_input_raises():
    model = tiny_llama()
    with pytest.raises(ValueError, match="give exactly one of max_cache_len .* and max_new_tokens"):
        StaticQuantizedKVCache(model, bits=4)
    with pytest.raises(ValueError, match="give exactly one of max_cache_len"):
        StaticQuantizedKVCache(model, bits=4, max_cache_len=64, max_new_tokens=8)
    with pytest.raises(ValueError, match="max_new_tokens=0 must be an integer >= 1"):
        StaticQuantizedKVCache(model, bits=4, max_new_tokens=0)
    with pytest.raises(ValueError, match="max_cache_len=0"):
        StaticQuantizedKVCache(model, bits=4, max_cache_len=0)
    with pytest.raises(ValueError,
                       match=r"bits=3 is not supported by StaticQuantizedKVCache; accepted values: \[2, 4, 8\]"):
        StaticQuantizedKVCache(model, bits=3, max_cache_len=64)
    with pytest.raises(ValueError, match="group_size=64 must divide head_dim=16"):
        StaticQuantizedKVCache(model, bits=4, max_cache_len=64)
    with pytest.raises(ValueError, match="fused=True needs the model"):
        StaticQuantizedKVCache(model.config, max_cache_len=64, fused=True, **SMALL)
    ids, mask = left_padded_prompt()
    cache = StaticQuantizedKVCache(model, max_cache_len=100, **SMALL)
    _generate(model, cache, ids, mask, new_tokens=2)
    cache.reset()
    with pytest.raises(ValueError, match="allocated for batch 2"):  # buffers are preallocated for the first batch
        _generate(model, cache, ids[:1], mask[:1], new_tokens=2)
    with pytest.raises(ValueError, match="fixed batch size"):
        cache.batch_repeat_interleave(2)
    right = mask.flip(-1)  # right padding: the fused decode supports left padding only
    with StaticQuantizedKVCache(model, max_cache_len=100, fused=True, **SMALL) as fused, \
            pytest.raises(ValueError, match="left padding only"):
        _generate(model, fused, ids, right, new_tokens=2)
    other = tiny_llama(num_layers=2, num_key_value_heads=4)
    with pytest.raises(ValueError, match="was built for"):
        _generate(other, StaticQuantizedKVCache(model, max_cache_len=100, **SMALL), ids, mask, new_tokens=2)


@pytest.mark.parametrize("bits, max_cache_len, g", [(4, 32768, 64), (8, 32768, 64), (4, 1010, 16), (2, 1010, 16)])
def test_registry_and_preallocated_bytes(bits, max_cache_len, g):
    """Registered as `quantized_static`; its bytes are fixed at allocation, counted exactly (token-packed value codes:
    D rows of `packed_columns(T_cap)` bytes, 16-byte aligned), and at 32k tokens int4 is within 0.3x of a bf16
    DynamicCache's, preallocation included (G=64, R=128: the int4 cache's own ratio)."""
    from transformers import LlamaConfig

    from kvpress_lite.kernels.layouts import token_packed_nbytes

    config = LlamaConfig(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, hidden_size=512,
                         head_dim=64)
    cache = build_cache("quantized_static", config, bits=bits, max_cache_len=max_cache_len, group_size=g)
    assert isinstance(cache, StaticQuantizedKVCache)
    for layer in cache.layers:
        layer.lazy_initialization(*[torch.zeros(1, 2, 0, 64, dtype=torch.bfloat16)] * 2)
    h, d = 2, 64
    t_cap = -(-max_cache_len // g) * g + g  # + one scratch block
    r_cap = 128 + g - 1 + 16  # residual_length + G - 1 + MAX_STEP
    per_layer = (h * t_cap * d * bits // 8 + token_packed_nbytes(1, h, d, t_cap, bits)  # key codes, value codes
                 + 2 * h * (t_cap // g) * d * 2 + 2 * h * t_cap * (d // g) * 2  # key / value scales and zeros (bf16)
                 + 2 * h * r_cap * d * 2 + 2 * 4)  # the window (bf16), lengths (int32 x 2)
    assert cache_nbytes(cache) == 2 * per_layer
    dynamic_bytes = 2 * 2 * h * max_cache_len * d * 2  # layers x (K, V) x heads x tokens x head_dim x bf16
    ratio = cache_nbytes(cache) / dynamic_bytes
    if g == 16:  # T_cap = 1040 tokens: 520 (int4) / 260 (int2) bytes per channel, padded to 528 / 272
        assert token_packed_nbytes(1, h, d, t_cap, bits) == h * d * {4: 528, 2: 272}[bits]
    if max_cache_len == 32768:  # int4 0.288, int8 0.539 (no alignment padding at T_cap = 32832: whole 16-byte rows)
        assert token_packed_nbytes(1, h, d, t_cap, bits) == h * t_cap * d * bits // 8
        assert round(ratio, 3) == {4: 0.288, 8: 0.539}[bits] and (bits != 4 or ratio <= 0.3), ratio


def _gpu_llama():
    return tiny_llama(dtype=torch.float32, hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64)


def _gpu_gemma3():  # sliding layers (StaticSlidingWindowKVLayer) and quantized full layers in one compiled step
    return tiny_gemma3(dtype=torch.float32, head_dim=64, hidden_size=256, sliding_window=64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernel under CUDA graphs)")
@pytest.mark.parametrize("make_model,bits", [(_gpu_llama, 4), (_gpu_llama, 8), (_gpu_gemma3, 4)],
                         ids=["llama-int4", "llama-int8", "gemma3-int4"])
def test_cuda_compiled_reduce_overhead_matches_eager(make_model, bits):
    """On the GPU, fp32: generate's own compile (inductor, CUDA graphs) gives the uncompiled Triton path's tokens."""
    model = make_model().cuda()
    ids, mask = left_padded_prompt(length=200, pad=17)
    ids, mask = ids.cuda(), mask.cuda()
    kw = dict(bits=bits, group_size=64, residual_length=64)
    with StaticQuantizedKVCache(model, max_cache_len=370, **kw) as cache:
        assert cache.fused
        seq_ref, _ = _generate(model, cache, ids, mask, new_tokens=150, disable_compile=True)
    with StaticQuantizedKVCache(model, max_cache_len=370, **kw) as cache:
        seq, _ = _generate(model, cache, ids, mask, new_tokens=150)
    assert torch.equal(seq, seq_ref)


@pytest.mark.model
def test_smollm2_static_equals_quantized_cache(smollm2):
    """The real SmolLM2-135M in bf16 with the defaults (int4, G=64, R=128): 300-token prompt, 70 greedy tokens (a flush
    at step 20): the uncompiled static cache gives QuantizedKVCache's logits bit for bit; the fused step path (the op's
    reference on CPU) the same greedy tokens."""
    model, tok = smollm2
    text = "def fibonacci(n):\n    " * 40
    ids = tok(text, return_tensors="pt").input_ids[:, :300]
    mask = torch.ones_like(ids)
    seq_ref, logits_ref = _generate(model, QuantizedKVCache(model, bits=4), ids, mask, new_tokens=70)
    cache = StaticQuantizedKVCache(model, bits=4, max_cache_len=370)
    seq, logits = _generate(model, cache, ids, mask, new_tokens=70)
    assert torch.equal(seq, seq_ref) and torch.equal(logits, logits_ref)
    with StaticQuantizedKVCache(model, bits=4, max_cache_len=370, fused=True) as fused:
        seq_fused, _ = _generate(model, fused, ids, mask, new_tokens=70)
    assert torch.equal(seq_fused, seq_ref)


if __name__ == "__main__" and "--interpret" in sys.argv:
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    print(json.dumps(_interpreted_triton_run()))
