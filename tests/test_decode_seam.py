"""The decode seam: `store.packed()` views, one `select` guard for eager and compiled decoding, implementations
registered per device, `kernels/` importing nothing above itself, and the bridge handshake written once."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch
import torch.nn.functional as F
from conftest import left_padded_prompt, tiny_llama

from kvpress_lite import kernels
from kvpress_lite.attention_bridge import BridgedLayerMixin
from kvpress_lite.kernels import PackedKV, decode, dispatch
from kvpress_lite.quant.static_storage import StaticQuantizedKV
from kvpress_lite.storage import StorageSpec

B, H, HQ, D = 2, 2, 4, 16
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _filled(key_mode: str, bits: int = 4, n: int = 45, seed: int = 0):
    torch.manual_seed(seed)
    keys, values = torch.randn(B, H, n, D), torch.randn(B, H, n, D)
    store = StorageSpec(bits, 8, 4, key_mode).new()
    store.append(keys, values)
    store.flush()
    return store


def _dense(query, keys, values, kv_start=None):
    """SDPA over full-precision keys/values `[B, H, L, D]`, GQA expanded, left padding from `kv_start`."""
    rep = query.shape[1] // keys.shape[1]
    mask = None
    if kv_start is not None:
        pos = torch.arange(keys.shape[2])
        mask = (pos[None, :] >= kv_start[:, None])[:, None, None, :]
    return F.scaled_dot_product_attention(query, keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1),
                                          attn_mask=mask)


@pytest.mark.parametrize("impl", ["torch", "sdpa"])
@pytest.mark.parametrize("key_mode", ["channel", "token"])
def test_quantized_kv_packed_decodes_like_its_dequantized_read(impl, key_mode):
    store = _filled(key_mode)
    packed = store.packed()
    assert isinstance(packed, PackedKV) and packed.key_mode == key_mode and packed.lengths is None
    assert packed.history_capacity == store.quantized_length > 0 and packed.residual_capacity == store.keys.shape[2]
    query = torch.randn(B, HQ, 1, D)
    kv_start = torch.tensor([0, 7])
    keys, values = store.read()
    out = decode(query, packed, kv_start, None, None, impl)
    torch.testing.assert_close(out, _dense(query, keys, values, kv_start), atol=1e-5, rtol=1e-5)


def test_static_packed_view_reads_only_the_valid_lengths():
    """The static storage's view (capacity buffers, device lengths) decodes as `QuantizedKV`'s compact view of the
    same tokens, garbage past the valid lengths included."""
    torch.manual_seed(0)
    keys, values = torch.randn(B, H, 45, D), torch.randn(B, H, 45, D)
    compact = StorageSpec(4, 8, 4, "channel").new()
    compact.append(keys, values)
    compact.flush()
    static = StaticQuantizedKV(4, 8, 4, max_cache_len=80)
    static.allocate(keys)
    for name in static.state_names:  # garbage everywhere, then the real tokens
        buffer = getattr(static, name)
        buffer.copy_(torch.randint(0, 200, buffer.shape).to(buffer.dtype))
    static.append_host(keys, values)
    packed = static.packed()
    assert packed.lengths is static.lengths and packed.valid_lengths() == (compact.quantized_length,
                                                                           compact.keys.shape[2])
    query = torch.randn(B, HQ, 2, D)
    for impl in ("torch", "sdpa"):
        torch.testing.assert_close(decode(query, packed, None, 0.3, None, impl),
                                   decode(query, compact.packed(), None, 0.3, None, impl), atol=1e-5, rtol=1e-5)


@pytest.fixture
def probe_impl():
    """A registered implementation "probe" (the reference, counting its calls); removed afterwards."""
    calls = []

    def fn(query, packed, kv_start, scaling, softcap):
        calls.append(torch.compiler.is_compiling())
        return kernels.reference_decode_attention(query, packed, kv_start, scaling, softcap)

    dispatch.register(dispatch.Implementation("probe", fn))
    yield calls
    dispatch.IMPLEMENTATIONS.pop("probe")
    dispatch._memo.clear()


def test_eager_and_compiled_run_the_implementation_select_chose(probe_impl):
    """`prefer` replaces "auto"; eagerly `decode` calls the implementation directly, compiled (fullgraph) through the
    op, whose body runs the same one: the same output both ways."""
    store = _filled("channel")
    query = torch.randn(B, HQ, 1, D)
    with kernels.prefer("probe"):
        chosen, _ = kernels.select("auto", query.device, query.dtype, D, 4, 8, "channel")
        assert chosen.name == "probe"
        eager = decode(query, store.packed(), None, None, None)
        torch._dynamo.reset()
        compiled = torch.compile(lambda q, p: decode(q, p, None, None, None), backend="aot_eager", fullgraph=True)
        out = compiled(query, store.packed())
    torch._dynamo.reset()
    assert torch.equal(out, eager)
    assert probe_impl == [False, False]  # both ran the function eagerly: the op's body runs after tracing
    assert kernels.select("auto", query.device, query.dtype, D, 4, 8, "channel")[0].name == "sdpa"  # prefer ended


def test_select_per_device_and_refusals():
    cpu = torch.device("cpu")
    assert dispatch.select("auto", cpu, torch.bfloat16, 64, 4, 64, "channel")[0].name == "sdpa"
    assert dispatch.select("torch", cpu, torch.bfloat16, 64, 4, 64, "channel")[0].name == "torch"
    chosen, reason = dispatch.select("auto", cpu, torch.int8, 64, 4, 64, "channel")
    assert chosen is None and "dtype" in reason
    if not dispatch.triton_available():
        assert dispatch.select("triton", cpu, torch.float32, 64, 4, 64, "channel")[0] is None
    with pytest.raises(ValueError, match=r"kernel_impl='cuda' is not supported; accepted values: \['auto'"):
        kernels.fused.check_options(None, "cuda")
    with pytest.raises(RuntimeError, match="cannot run here"):
        if dispatch.triton_available() and dispatch._interpreting():
            pytest.skip("TRITON_INTERPRET=1: the Triton kernel runs on CPU here")
        decode(torch.randn(B, HQ, 1, D), _filled("channel").packed(), None, None, None, "triton")


def test_kernels_import_nothing_above_themselves():
    """Every module of kvpress_lite/kernels imports only itself, kvpress_lite.kivi (pure quantizer functions) and
    third-party packages: no caches, storage, bridge or compat."""
    allowed_parents = {"kivi"}
    for path in sorted((ROOT / "kvpress_lite" / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                assert node.module in allowed_parents, f"{path.name} imports ..{node.module}"
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert not node.module.startswith("kvpress_lite"), f"{path.name} imports {node.module}"


def test_every_bridged_layer_uses_the_mixin_handshake():
    """Layers that attend through the bridge share one handshake: they subclass `BridgedLayerMixin` and write only
    `bridged_attention`, never `attend` / `expect` themselves."""
    from kvpress_lite.eviction.layer import EvictionLayer
    from kvpress_lite.quant.layer import QuantizedKVLayer
    from kvpress_lite.quant.static_layer import StaticQuantizedKVLayer
    from kvpress_lite.sliding import StaticSlidingWindowKVLayer

    for cls in (QuantizedKVLayer, StaticQuantizedKVLayer, StaticSlidingWindowKVLayer, EvictionLayer):
        assert issubclass(cls, BridgedLayerMixin)
        assert cls.attend is BridgedLayerMixin.attend and "bridged_attention" in cls.__dict__, cls


def test_static_reset_checks_the_next_short_prompt_for_left_padding():
    """After reset(), a prompt of <= 16 tokens takes the host path again, which checks its mask: a right-padded one
    raises (before the fix, the layer remembered the old prompt and decoded it on the step path unchecked)."""
    from kvpress_lite import StaticQuantizedKVCache
    from kvpress_lite._compat import cache_kwarg

    model = tiny_llama()
    ids, mask = left_padded_prompt(length=30)
    with StaticQuantizedKVCache(model, max_cache_len=60, fused=True, bits=4, group_size=16,
                                residual_length=16) as cache:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                       **{cache_kwarg(model): cache})
        assert all(layer.bridge_seen for layer in cache.layers)
        cache.reset()
        assert not any(layer.bridge_seen for layer in cache.layers)
        short = ids[:, :10]
        right = torch.ones_like(short)
        right[1, -3:] = 0  # right padding
        with pytest.raises(ValueError, match="left padding only"):
            model(input_ids=short, attention_mask=right, **{cache_kwarg(model): cache})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (eager Triton decoding)")
def test_cuda_eager_decoding_takes_the_forced_implementation(monkeypatch):
    """On CUDA, eager fused decoding runs what `select` chose: the Triton kernel by default, never with
    kernel_impl="sdpa" (before the seam `attend_store` launched Triton there anyway); same greedy tokens."""
    pytest.importorskip("triton", reason="triton is not installed (optional dependency)")
    from kvpress_lite import QuantizedKVCache
    from kvpress_lite._compat import cache_kwarg

    model = tiny_llama(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64).cuda()
    ids, mask = left_padded_prompt(length=200, pad=17)
    ids, mask = ids.cuda(), mask.cuda()
    triton_impl = dispatch.IMPLEMENTATIONS["triton"]
    calls = []

    def counting(*args):
        calls.append(1)
        return triton_impl.fn(*args)

    monkeypatch.setitem(dispatch.IMPLEMENTATIONS, "triton", dispatch.Implementation(
        "triton", counting, triton_impl.refusal, triton_impl.device_lengths))
    dispatch._memo.clear()
    outputs = {}
    for impl in ("auto", "sdpa"):
        calls.clear()
        with QuantizedKVCache(model, bits=4, group_size=64, residual_length=64, kernel_impl=impl) as cache:
            assert cache.fused
            outputs[impl] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, do_sample=False,
                                           **{cache_kwarg(model): cache})
        assert (len(calls) > 0) == (impl == "auto"), (impl, len(calls))
    dispatch._memo.clear()
    assert torch.equal(outputs["auto"], outputs["sdpa"])


def test_unplain_kwargs_names_what_no_kernel_computes():
    from kvpress_lite.kernels import fused

    assert fused.unplain_kwargs({"scaling": 0.1, "softcap": 30.0, "sliding_window": None, "dropout": 0.0}) == []
    assert fused.plain_kwargs({"scaling": 0.1, "softcap": 30.0})
    asked = {"sliding_window": 512, "s_aux": torch.zeros(2), "position_bias": None, "dropout": 0.1}
    assert fused.unplain_kwargs(asked) == ["sliding_window", "s_aux", "dropout"]
    assert not fused.plain_kwargs(asked)
