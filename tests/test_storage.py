"""The storage seam (kvpress_lite.storage), model-free: each operation on the stored slots equals the same operation
on the tensors the storage reads back."""

from __future__ import annotations

import pytest
import torch

from kvpress_lite import cache_nbytes
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


def test_int4_bytes_follow_the_kivi_arithmetic():
    store = StorageSpec(4, 64, 128).new()
    store.append(torch.randn(1, 3, 4096, 64, dtype=torch.bfloat16), torch.randn(1, 3, 4096, 64, dtype=torch.bfloat16))
    store.flush()
    elems = 3 * 64
    assert cache_nbytes(store) == pytest.approx(2 * (3968 * elems * (0.5 + 4 / 64) + 128 * elems * 2), rel=1e-6)


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
