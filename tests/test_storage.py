"""The storage seam (kvpress_lite.storage), model-free: each operation on the stored slots equals the same operation
on the tensors the storage reads back."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from interpreted import interpreted_json

from kvpress_lite import cache_nbytes
from kvpress_lite.kernels.layouts import packed_columns, token_packed_nbytes
from kvpress_lite.kernels.packed import TOKEN_PACKED
from kvpress_lite.quant.static_storage import StaticQuantizedKV
from kvpress_lite.storage import FullPrecisionKV, QuantizedKV, StorageSpec

B, H, D = 2, 4, 16
STEP = {8: 0.05, 4: 0.8, 2: 3.0}  # max round-trip error of randn data (one quantization step)


def filled(spec: StorageSpec, n: int = 45, seed: int = 0):
    """A storage holding `n` random tokens appended in odd chunks (flushed after each), and the raw tokens."""
    torch.manual_seed(seed)
    keys, values = torch.randn(B, H, n, D), torch.randn(B, H, n, D)
    store, seen = spec.new(), 0
    for chunk in (13, 1, 7, 1, 1, n - 23):
        store.append(keys[:, :, seen : seen + chunk], values[:, :, seen : seen + chunk])
        store.flush()
        seen += chunk
    return store, keys, values


def random_keep(P: int, K: int, seed: int = 1) -> torch.Tensor:
    """`[B, H, K]` sorted slot indices, different in every row and head."""
    torch.manual_seed(seed)
    return torch.rand(B, H, P).topk(K, dim=-1).indices.sort(dim=-1).values


SPECS = [
    pytest.param(StorageSpec(), id="full"),
    *[pytest.param(StorageSpec(bits, 8, 4, mode), id=f"int{bits}-{mode}")
      for bits in (8, 4, 2) for mode in ("channel", "token")],
]


@pytest.mark.parametrize("spec", SPECS)
def test_append_reads_back_history_then_new_tokens(spec):
    store, keys, values = filled(spec)
    k, v = store.read()
    assert k.shape == (B, H, 45, D) and store.length == 45
    tol = STEP.get(spec.bits, 0.0)
    assert (k - keys).abs().max() <= tol and (v - values).abs().max() <= tol
    if spec.quantized:  # the residual window is exact and sits at the end
        residual = store.keys.shape[-2]
        assert torch.equal(k[:, :, -residual:], keys[:, :, -residual:])
        assert spec.residual_length <= residual < spec.residual_length + 8  # flush block: 8 (token), G=8 (channel)
        assert store.quantized_length + residual == 45
    new_k, new_v = torch.randn(B, H, 3, D), torch.randn(B, H, 3, D)
    store.append(new_k, new_v)  # before a flush, appending is exactly a concatenation
    k2, v2 = store.read()
    assert torch.equal(k2, torch.cat([k, new_k], dim=2)) and torch.equal(v2, torch.cat([v, new_v], dim=2))


@pytest.mark.parametrize("spec", SPECS)
def test_keep_equals_gather_of_what_was_read(spec):
    store, _, _ = filled(spec)
    before_k, before_v = store.read()
    T = store.quantized_length if spec.quantized else 0
    index = random_keep(45, 20)
    store.keep(index)
    after_k, after_v = store.read()
    expect_k = before_k.gather(2, index[..., None].expand(-1, -1, -1, D))
    expect_v = before_v.gather(2, index[..., None].expand(-1, -1, -1, D))
    assert after_k.shape == (B, H, 20, D) and store.length == 20
    if not spec.quantized:
        assert torch.equal(after_k, expect_k) and torch.equal(after_v, expect_v)
        return
    if spec.key_mode == "token":
        # slots that were quantized are gathered code for code, kept residual slots stay exact; only residual slots
        # taken into the history (rows that kept fewer history slots) are rounded once
        unchanged = (index < T) | (torch.arange(20) >= store.quantized_length)
        assert torch.equal(after_k[unchanged], expect_k[unchanged])
        assert torch.equal(after_v[unchanged], expect_v[unchanged])
        assert store.quantized_length == int((index < T).sum(-1).max())
    tol = STEP[spec.bits]  # channel keys: the kept slots are quantized again (one more rounding of <= 1 step)
    assert (after_k - expect_k).abs().max() <= tol and (after_v - expect_v).abs().max() <= tol


@pytest.mark.parametrize("spec", SPECS)
def test_batch_reorder_and_select_permute_every_tensor(spec):
    store, _, _ = filled(spec)
    k, v = store.read()
    store.reorder_cache(torch.tensor([1, 0]))
    k2, v2 = store.read()
    assert torch.equal(k2, k.flip(0)) and torch.equal(v2, v.flip(0))
    store.batch_select_indices(torch.tensor([1]))
    assert torch.equal(store.read()[0], k[:1])


def test_keep_then_append_keeps_slot_order_and_frees_memory():
    spec = StorageSpec(4, 8, 4, "token")
    store, keys, _ = filled(spec, n=200)
    full = cache_nbytes(store)
    store.keep(random_keep(200, 40))
    assert cache_nbytes(store) < full * 40 / 200 * 1.5  # new compact tensors; the old buffers are gone
    store.append(keys[:, :, :2], keys[:, :, :2])
    assert torch.equal(store.read()[0][:, :, -2:], keys[:, :, :2])


@pytest.mark.parametrize("tokens", [4096, 4096 + 64])
def test_int4_bytes_follow_the_kivi_arithmetic(tokens):
    """Keys: T x D / 2 code bytes; values token-packed: D rows of `packed_columns(T)` bytes (16-byte aligned: T = 3968
    is 1984 bytes, aligned; T = 4032 is 2016 -> 2016); scales and zeros 2 x 2 bytes per group; the window in bf16."""
    store = StorageSpec(4, 64, 128).new()
    store.append(*[torch.randn(1, 3, tokens, 64, dtype=torch.bfloat16)] * 2)
    store.flush()
    t = store.quantized_length
    assert t == tokens - 128
    elems = 3 * 64
    codes = t * elems // 2 + token_packed_nbytes(1, 3, 64, t, 4)
    assert token_packed_nbytes(1, 3, 64, t, 4) == elems * packed_columns(t, 4) >= t * elems // 2
    assert cache_nbytes(store) == codes + 2 * t * elems * 4 // 64 + 2 * 128 * elems * 2


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_value_codes_grow_in_place_and_stay_exactly_aligned(bits):
    """Each flush appends value codes into the token-packed buffer's 16-byte padding while there is room (same
    storage) and reallocates only past it; the buffer is always `packed_columns(T)` bytes per channel."""
    store = QuantizedKV(bits, 8, 0, "token")
    before, in_place = None, 0
    for _ in range(20):
        store.append(*[torch.randn(B, H, 8, D)] * 2)
        store.flush()
        t = store.quantized_length
        assert store.value_codes.shape == (B, H, D, packed_columns(t, bits))
        assert store.value_scale.shape[2] == t
        if before is not None and before[0] == store.value_codes.shape:
            assert before[1] == store.value_codes.data_ptr()  # room left: written in place
            in_place += 1
        before = store.value_codes.shape, store.value_codes.data_ptr()
    assert in_place == 20 - -(-160 // (16 * 8 // bits))  # reallocated once per 16 bytes of tokens per channel


@pytest.mark.parametrize("spec", SPECS[1:])
def test_packed_view_reports_token_packed_values(spec):
    store, _, _ = filled(spec)
    packed = store.packed()
    t = store.quantized_length
    assert packed.value_layout == TOKEN_PACKED and packed.history_capacity == t
    assert packed.value_codes.shape == (B, H, D, packed_columns(t, spec.bits))


def test_flat_op_validates_token_packed_values_of_a_storage():
    """`quantized_decode_attention(..., value_layout="token")` takes a storage's tensors flat (T from the scales) and
    computes what the seam computes over `packed()`; a wrong shape or layout name raises."""
    from kvpress_lite.kernels import quantized_decode_attention
    from kvpress_lite.kernels.reference import reference_decode_attention

    store, _, _ = filled(StorageSpec(4, 8, 4))
    p = store.packed()
    query = torch.randn(B, 2 * H, 1, D)
    flat = dict(key_codes=p.key_codes, key_scale=p.key_scale, key_zero=p.key_zero, value_codes=p.value_codes,
                value_scale=p.value_scale, value_zero=p.value_zero, residual_keys=p.residual_keys,
                residual_values=p.residual_values, bits=4, group_size=8, scaling=D ** -0.5, impl="torch")
    out = quantized_decode_attention(query, **flat, value_layout="token")
    assert torch.equal(out, reference_decode_attention(query, p, None, D ** -0.5))
    t = store.quantized_length
    with pytest.raises(ValueError, match=rf"value_codes has shape .*expected \({B}, {H}, {t}, {D // 2}\)"):
        quantized_decode_attention(query, **flat)  # channel layout expected: [B, H, T, D / 2]
    with pytest.raises(ValueError, match="value_layout='rows' is not supported"):
        quantized_decode_attention(query, **flat, value_layout="rows")


def _static_store(bits: int, g: int = 8, r: int = 4, dim: int = D, prompt: int = 21, steps: int = 14, seed: int = 0):
    """A static storage after a prompt (host path) and `steps` compiled-path steps of one token (flush_step +
    append_step, eager here), and a `QuantizedKV` fed the same tokens (flushed after each)."""
    torch.manual_seed(seed)
    n = prompt + steps
    keys, values = torch.randn(B, H, n, dim), torch.randn(B, H, n, dim)
    static, dynamic = StaticQuantizedKV(bits, g, r, max_cache_len=n + 8), QuantizedKV(bits, g, r)
    static.allocate(keys)
    static.append_host(keys[:, :, :prompt], values[:, :, :prompt])
    dynamic.append(keys[:, :, :prompt], values[:, :, :prompt])
    dynamic.flush()
    for i in range(prompt, n):
        static.flush_step()
        static.append_step(keys[:, :, i : i + 1], values[:, :, i : i + 1])
        dynamic.append(keys[:, :, i : i + 1], values[:, :, i : i + 1])
    dynamic.flush()
    static.flush_step()  # the due block of the last step (what QuantizedKV flushed right after it)
    return static, dynamic


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_static_storage_is_token_packed_and_equals_quantized_kv(bits):
    """The static storage's value codes are token-packed `[B, H, D, packed_columns(T_cap)]`, its step path writes them
    in place (whole byte columns at t * bits / 8), and what it holds equals `QuantizedKV`'s history code for code."""
    static, dynamic = _static_store(bits)
    packed = static.packed()
    assert packed.value_layout == TOKEN_PACKED
    assert static.value_codes.shape == (B, H, D, packed_columns(static.history_capacity, bits))
    t, r = static.host_lengths()
    assert t == dynamic.quantized_length > 0 and r == dynamic.keys.shape[2]
    from kvpress_lite.kernels.layouts import unpack_tokens

    assert torch.equal(unpack_tokens(static.value_codes, bits, t), unpack_tokens(dynamic.value_codes, bits, t))
    hist = static.dequantized_history(t)
    assert torch.equal(hist[0], dynamic.dequantized_history()[0])
    assert torch.equal(hist[1], dynamic.dequantized_history()[1])


def test_static_storage_keeps_channel_values_when_a_block_is_not_whole_bytes():
    """G = 2 tokens at int2 (4 codes per byte): a flushed block would share bytes, so the values stay channel-packed
    (the kernel reads both layouts); same tensors as `QuantizedKV` all the same."""
    static, dynamic = _static_store(2, g=2, r=2)
    assert static.packed().value_layout == "channel"
    t, _ = static.host_lengths()
    assert torch.equal(static.dequantized_history(t)[1], dynamic.dequantized_history()[1])


def test_truncate_within_the_window_only():
    store, _, _ = filled(StorageSpec(8, 8, 4))
    store.truncate(2)
    assert store.length == 43
    with pytest.raises(ValueError, match="quantized blocks cannot be rolled back"):
        store.truncate(40)
    full = FullPrecisionKV()
    full.append(torch.zeros(B, H, 5, D), torch.zeros(B, H, 5, D))
    full.truncate(2)
    assert full.length == 3


def test_constant_groups_decode_exactly_without_nan():
    store = QuantizedKV(4, 8, 0, "token")
    store.append(torch.full((B, H, 24, D), 3.25), torch.full((B, H, 24, D), -1.5))
    store.flush()
    k, v = store.read()
    assert store.quantized_length == 24
    assert torch.equal(k, torch.full_like(k, 3.25)) and torch.equal(v, torch.full_like(v, -1.5))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 3}, r"bits=3 is not supported; accepted values: \[2, 4, 8\]"),
        ({"bits": True}, "bits=True"),
        ({"group_size": 0}, "group_size=0"),
        ({"residual_length": -1}, "residual_length=-1"),
        ({"key_mode": "row"}, r"key_mode='row' .*accepted values: \['channel', 'token'\]"),
    ],
)
def test_bad_storage_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StorageSpec(**kwargs)


def test_group_size_must_divide_head_dim():
    accepted = r"accepted values: \[1, 2, 4, 8, 16, 32, 64\]"
    with pytest.raises(ValueError, match=r"group_size=24 must divide head_dim=64.*" + accepted):
        StorageSpec(4, 24).check_head_dim(64)


def _interpreted_kernel_over_storages() -> dict:
    """In a process with TRITON_INTERPRET=1: the Triton kernel (through the seam, impl "triton") over the `packed()` of
    real storages against the torch reference; {case: relative error}."""
    from kvpress_lite.kernels.dispatch import decode
    from kvpress_lite.kernels.reference import reference_decode_attention

    torch.set_num_threads(1)
    results = {}
    dim = 32
    for bits in (8, 4, 2):
        cases = {}
        for mode in ("channel", "token"):  # QuantizedKV (channel keys) and the evicting storage's (token keys)
            torch.manual_seed(bits)
            store = QuantizedKV(bits, 16, 8, mode)
            kv = torch.randn(B, 2, 75, dim)
            store.append(kv, kv.flip(2))
            store.flush()
            if mode == "token":
                store.keep(torch.rand(B, 2, store.length).topk(50, dim=-1).indices.sort(dim=-1).values)
            cases[f"int{bits}-{mode}"] = store
        cases[f"int{bits}-static"] = _static_store(bits, g=16, r=8, dim=dim, prompt=40, steps=19, seed=bits)[0]
        for name, store in cases.items():
            packed = store.packed()
            assert packed.value_layout == TOKEN_PACKED, name
            query = torch.randn(B, 4, 1, dim)
            ref = reference_decode_attention(query, packed, None, dim ** -0.5)
            out = decode(query, packed, None, dim ** -0.5, 0.0, impl="triton")
            results[name] = float((out - ref).abs().max() / ref.abs().max())
    return results


def test_triton_kernel_over_storage_packed_views_interpreted():
    """The kernel (v4, token-packed values) reads what the storages produce: `QuantizedKV` (channel keys; token keys
    after an eviction) and the static storage (capacity buffers, valid lengths on the device), bits 8/4/2, equal to
    the reference within fp32 rounding (TRITON_INTERPRET=1 in a subprocess: it must be set before triton imports)."""
    errors = interpreted_json(__file__)
    assert len(errors) == 9
    assert all(err < 1e-4 for err in errors.values()), errors


if __name__ == "__main__" and "--interpret" in sys.argv:
    print(json.dumps(_interpreted_kernel_over_storages()))
