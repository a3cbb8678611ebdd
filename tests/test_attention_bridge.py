"""The attention bridge (kvpress_lite.attention_bridge) and the fused decode path it carries (kernels/fused.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gemma3, tiny_llama
from interpreted import run_interpreted

from kvpress_lite import EvictionCache, QuantizedKVCache, attention_bridge
from kvpress_lite._compat import DynamicCache, attention_implementation, cache_kwarg
from kvpress_lite.storage import QuantizedKV

torch.set_num_threads(1)


def left_padded(batch=2, length=24, pad=5, vocab=128, seed=0):
    ids = torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :pad] = 0
    return ids, mask


def generate(model, cache, ids, mask, new=8):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0,
                          **{cache_kwarg(model): cache})


def logits(out):
    return torch.stack(out.logits)


# ------------------------------------------------------------------------------------------------ bridge


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_attached_model_computes_exactly_the_base_attention(impl):
    model = tiny_llama(impl)
    ids, mask = left_padded()
    before = logits(generate(model, DynamicCache(config=model.config), ids, mask))
    with attention_bridge.attach(model) as attachment:
        assert attention_implementation(model) == f"kvpress_lite_bridged_{impl}"
        during = logits(generate(model, DynamicCache(config=model.config), ids, mask))
        assert attachment.active
    assert torch.equal(during, before)
    assert attention_implementation(model) == impl and not attention_bridge.is_attached(model)


def test_attachments_are_reference_counted_and_detach_is_idempotent():
    model = tiny_llama()
    first, second = attention_bridge.attach(model), attention_bridge.attach(model)
    first.detach()
    first.detach()
    assert attention_implementation(model) == "kvpress_lite_bridged_sdpa"
    second.detach()
    assert attention_implementation(model) == "sdpa"


def test_unsupported_attention_implementation_is_refused():
    model = tiny_llama()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2' is not supported by X"):
        attention_bridge.attach(model, "X")


class _Recorder:
    layer_idx = 0

    def __init__(self):
        self.calls = 0

    def attend(self, base, module, query, key, value, attention_mask, **kwargs):
        self.calls += 1
        return base(module, query, key, value, attention_mask, **kwargs)


def test_a_stale_pending_layer_never_captures_another_forward():
    model = tiny_llama()
    ids, mask = left_padded()
    reference = logits(generate(model, DynamicCache(config=model.config), ids, mask))
    stale = _Recorder()
    with attention_bridge.attach(model):
        attention_bridge.expect(stale, torch.zeros(1))  # its keys are not what layer 0 attends over
        out = logits(generate(model, DynamicCache(config=model.config), ids, mask))
    assert stale.calls == 0 and torch.equal(out, reference)


def test_kv_start_from_mask():
    assert attention_bridge.kv_start_from_mask(None, 1, 10) == (True, None)
    allowed = torch.ones(2, 1, 2, 6, dtype=torch.bool)
    allowed[:, :, 0, 5] = False  # causal among the last 2 queries
    allowed[1, :, :, :3] = False  # row 1: 3 left pads
    ok, start = attention_bridge.kv_start_from_mask(allowed, 2, 6)
    assert ok and start.tolist() == [0, 3]
    additive = torch.zeros(2, 1, 2, 6).masked_fill(~allowed, torch.finfo(torch.float32).min)
    ok, start = attention_bridge.kv_start_from_mask(additive, 2, 6)
    assert ok and start.tolist() == [0, 3]
    right = allowed.clone()
    right[0, :, :, 2] = False  # a hole after real tokens: not left padding
    assert attention_bridge.kv_start_from_mask(right, 2, 6) == (False, None)
    no_causal = torch.ones(2, 1, 2, 6, dtype=torch.bool)  # the first query sees the last key: not causal
    assert attention_bridge.kv_start_from_mask(no_causal, 2, 6) == (False, None)


# ------------------------------------------------------------------------------------------------ fused path


class _CountDequantize:
    """Counts `QuantizedKV.dequantized_history` calls (the O(L) copy the fused path removes)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = QuantizedKV.dequantized_history

        def counting(store):
            self.calls += 1
            return original(store)

        monkeypatch.setattr(QuantizedKV, "dequantized_history", counting)


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_fused_decode_matches_the_dequantize_path(make_model, impl, monkeypatch):
    """CPU, fp32, the op's torch reference behind the bridge: same logits as SDPA/eager over a dequantized copy, and
    decoding forwards never dequantize the history."""
    model = make_model(impl)
    ids, mask = left_padded()
    params = dict(bits=4, group_size=8, residual_length=4)
    plain = logits(generate(model, QuantizedKVCache(model.config, **params), ids, mask, new=10))
    counter = _CountDequantize(monkeypatch)
    with QuantizedKVCache(model, fused=True, kernel_impl="torch", **params) as cache:
        assert cache.fused
        out = generate(model, cache, ids, mask, new=10)
        full = [layer for layer in cache.layers if hasattr(layer, "store")]
        assert full and all(layer.quantized_length > 0 for layer in full)
    assert counter.calls == len(full)  # the prompt's forward only (one per full-attention layer)
    assert (logits(out) - plain).abs().max().item() <= 1e-4
    assert attention_implementation(model) == impl


def test_fused_options_are_validated():
    model = tiny_llama()
    with pytest.raises(ValueError, match="fused=True needs the model"):
        QuantizedKVCache(model.config, fused=True)
    with pytest.raises(ValueError, match="fused='yes' is not supported"):
        QuantizedKVCache(model, fused="yes")
    with pytest.raises(ValueError, match="kernel_impl='cuda' is not supported"):
        QuantizedKVCache(model, kernel_impl="cuda")
    assert not QuantizedKVCache(model.config, group_size=8).fused
    assert not QuantizedKVCache(model, group_size=8).fused  # auto on CPU: the torch path, model untouched
    cache = QuantizedKVCache(model, group_size=8, fused=False)
    assert not cache.fused and attention_implementation(model) == "sdpa"


def test_fused_forward_that_bypasses_the_bridge_raises():
    model = tiny_llama()
    ids, mask = left_padded()
    cache = QuantizedKVCache(model, fused=True, kernel_impl="torch", group_size=8, residual_length=4)
    generate(model, cache, ids, mask, new=2)
    layer = cache.layers[0]
    states = torch.randn(2, 2, 1, 16)
    layer.update(states, states)  # a decoding forward: fused, returns the residual only
    assert layer._fused
    with pytest.raises(RuntimeError, match="did not run through kvpress_lite's attention bridge"):
        layer.update(states, states)
    cache.detach()


def test_eviction_with_bits_fuses_policies_without_attention(monkeypatch):
    model = tiny_llama()
    ids, mask = left_padded(length=30, pad=6)
    params = dict(budget=12, sinks=1, recent=2, slack=5, bits=4, group_size=8, residual_length=2)
    with EvictionCache(model, policy="knorm", fused=False, **params) as cache:
        plain = logits(generate(model, cache, ids, mask, new=12))
    counter = _CountDequantize(monkeypatch)
    with EvictionCache(model, policy="knorm", fused=True, kernel_impl="torch", **params) as cache:
        out = logits(generate(model, cache, ids, mask, new=12))
        layer = cache.layers[0]
        assert layer.physical_length <= 12 + layer.slack and layer.store.quantized_length > 0
    assert (out - plain).abs().max().item() <= 1e-4
    evictions = counter.calls
    with EvictionCache(model, policy="kvzip", fused=True, kernel_impl="torch", **params) as cache:  # not fused
        generate(model, cache, ids, mask, new=12)
    assert counter.calls - evictions >= 2 * 12  # max over query heads: every decoding forward read the history
    assert evictions <= 2 * 3  # knorm: only the prompt's forward and the evictions (every 6th step) dequantize


@pytest.mark.parametrize("policy", ["snapkv", "h2o", "tova"])
def test_eviction_with_bits_scores_decode_steps_from_the_kernels_probabilities(monkeypatch, policy):
    """Attention-ranked policies with `bits`: a decode step is one pass of the decode seam over the packed slots (the
    fp32 reference here, the Triton kernel on CUDA) whose per-slot probabilities update the scores; same logits,
    same kept positions and scores as the dequantized path, and the history is no longer dequantized per step."""
    model = tiny_llama()
    ids, mask = left_padded(length=30, pad=6)
    params = dict(budget=12, sinks=1, recent=2, slack=5, bits=4, group_size=8, residual_length=2)
    with EvictionCache(model, policy=policy, fused=False, **params) as cache:
        plain = logits(generate(model, cache, ids, mask, new=12))
        plain_state = [(layer.positions.clone(), layer.scores.clone()) for layer in cache.layers]
    counter = _CountDequantize(monkeypatch)
    with EvictionCache(model, policy=policy, fused=True, kernel_impl="torch", **params) as cache:
        out = logits(generate(model, cache, ids, mask, new=12))
        assert all(layer._fused for layer in cache.layers)  # the last step went through the kernel path
        state = [(layer.positions, layer.scores) for layer in cache.layers]
    assert (out - plain).abs().max().item() <= 1e-4
    for (positions, scores), (plain_positions, plain_scores) in zip(state, plain_state):
        assert torch.equal(positions, plain_positions)
        torch.testing.assert_close(scores, plain_scores, atol=1e-5, rtol=1e-4)
    assert counter.calls <= 2 * 3  # the prompt's forward and evictions only, not every one of the 12 steps


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton kernel)")
def test_gpu_fused_decode_runs_the_kernel_and_matches(monkeypatch):
    pytest.importorskip("triton")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    ids, mask = left_padded(length=300, pad=37, vocab=256)
    ids, mask = ids.cuda(), mask.cuda()
    plain = logits(generate(model, QuantizedKVCache(model.config, bits=4, residual_length=32), ids, mask, new=8))
    counter = _CountDequantize(monkeypatch)
    with QuantizedKVCache(model, bits=4, residual_length=32) as cache:  # auto: CUDA + triton
        assert cache.fused
        out = logits(generate(model, cache, ids, mask, new=8))
    assert counter.calls == 2  # prompt only
    rel = ((out.float() - plain.float()).norm() / plain.float().norm()).item()
    assert rel < 2e-2, rel


_TRITON_EVICTION = """
import sys, torch
sys.path.insert(0, "tests")
from conftest import tiny_llama
from test_attention_bridge import generate, left_padded, logits
from kvpress_lite import EvictionCache
model = tiny_llama()
ids, mask = left_padded(length=30, pad=6)
params = dict(budget=12, sinks=1, recent=2, slack=5, bits=4, group_size=8, residual_length=2)
with EvictionCache(model, policy="h2o", fused=False, **params) as cache:
    plain = logits(generate(model, cache, ids, mask, new=6))
    kept = [layer.positions.clone() for layer in cache.layers]
with EvictionCache(model, policy="h2o", fused=True, kernel_impl="triton", **params) as cache:
    out = logits(generate(model, cache, ids, mask, new=6))
    assert all(layer._fused for layer in cache.layers)
    assert all(torch.equal(layer.positions, k) for layer, k in zip(cache.layers, kept))
print("max abs logit difference", (out - plain).abs().max().item())
assert (out - plain).abs().max().item() <= 1e-4
"""


def test_eviction_kernel_scores_through_the_triton_kernel_interpreted():
    """The same decode steps through the Triton kernel itself (its probability outputs), run by Triton's interpreter
    on the CPU in a subprocess (TRITON_INTERPRET must be set before triton is imported)."""
    proc = run_interpreted(["-c", _TRITON_EVICTION])
    assert "max abs logit difference" in proc.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_one_pass_decode_attention_equals_eager(dtype, mask_kind, softcap):
    """`observe.decode_attention` (grouped products, the scale in the product's epilogue, fp32 softmax) against eager
    attention over repeated KV heads: same output and probabilities, masks (bool / additive) and softcap included."""
    from kvpress_lite.eviction.observe import decode_attention

    torch.manual_seed(0)
    B, Hq, Hkv, P, D = 2, 8, 2, 37, 16
    q = torch.randn(B, Hq, 1, D, dtype=dtype)
    k, v = torch.randn(B, Hkv, P, D, dtype=dtype), torch.randn(B, Hkv, P, D, dtype=dtype)
    allowed = torch.ones(B, 1, 1, P, dtype=torch.bool)
    allowed[0, ..., :5] = False  # row 0: 5 left pads
    mask = None
    if mask_kind == "bool":
        mask = allowed
    elif mask_kind == "additive":
        mask = torch.zeros(B, 1, 1, P, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    scaling = 0.3
    out, probs = decode_attention(q, k, v, mask, scaling, softcap)
    kk, vv = k.float().repeat_interleave(Hq // Hkv, 1), v.float().repeat_interleave(Hq // Hkv, 1)
    logits = q.float() @ kk.transpose(-1, -2) * scaling
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if mask is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    ref_probs = logits.softmax(-1)
    ref_out = (ref_probs @ vv).transpose(1, 2)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert probs.dtype == torch.float32 and probs.shape == (B, Hq, 1, P)
    torch.testing.assert_close(probs, ref_probs, atol=tol, rtol=tol)
    torch.testing.assert_close(out.float(), ref_out, atol=tol, rtol=tol)
    if mask is not None:
        assert probs[0, ..., :5].abs().max() == 0  # pads get no probability
