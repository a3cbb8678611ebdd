"""Model-free tests of the KIVI group-wise quantizers (kvpress_lite.kivi)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_lite.kivi import (
    dequantize_keys,
    dequantize_values,
    next_float,
    pack,
    quantize_keys,
    quantize_values,
    unpack,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BITS = [2, 4, 8]


def _error_bound(x: torch.Tensor, dim: int, bits: int) -> torch.Tensor:
    """Half a quantization step per group plus a few ulps of the storage dtype (scale/zero are rounded)."""
    xf = x.float()
    lo, hi = xf.amin(dim, keepdim=True), xf.amax(dim, keepdim=True)
    eps = torch.finfo(x.dtype).eps
    tiny = torch.finfo(x.dtype).smallest_normal * eps  # one subnormal ulp: a tiny scale is rounded up by it
    step = (hi - lo) / ((1 << bits) - 1)
    return 0.5 * (step * (1 + 4 * eps) + tiny) + 4 * eps * (xf.abs().amax(dim, keepdim=True) + (hi - lo))


@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (2, 4, 8, 16), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape[-1] == 16 * bits // 8
    assert torch.equal(unpack(packed, bits), codes)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    dtype=st.sampled_from(DTYPES),
    blocks=st.integers(1, 3),
    group=st.sampled_from([4, 8, 16]),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_key_round_trip_within_half_step(bits, dtype, blocks, group, scale, seed):
    torch.manual_seed(seed)
    keys = (torch.randn(2, 3, blocks * group, 16) * scale).to(dtype)
    codes, s, z = quantize_keys(keys, bits, group)
    assert codes.dtype == torch.uint8 and codes.shape == (2, 3, blocks * group, 16 * bits // 8)
    assert s.shape == z.shape == (2, 3, blocks, 16)
    out = dequantize_keys(codes, s, z, bits, group)
    assert out.dtype == dtype and out.shape == keys.shape
    err = (out.float() - keys.float()).view(2, 3, blocks, group, 16).abs()
    bound = _error_bound(keys.view(2, 3, blocks, group, 16), 3, bits)
    assert torch.isfinite(out).all()
    assert (err <= bound).all(), float((err - bound).max())


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    dtype=st.sampled_from(DTYPES),
    tokens=st.integers(1, 37),
    group=st.sampled_from([4, 8, 16]),
    seed=st.integers(0, 2**16),
)
def test_value_round_trip_within_half_step_any_length(bits, dtype, tokens, group, seed):
    torch.manual_seed(seed)
    values = torch.randn(2, 4, tokens, 16).to(dtype)
    codes, s, z = quantize_values(values, bits, group)
    assert s.shape == (2, 4, tokens, 16 // group)
    out = dequantize_values(codes, s, z, bits, group)
    err = (out.float() - values.float()).view(2, 4, tokens, 16 // group, group).abs()
    bound = _error_bound(values.view(2, 4, tokens, 16 // group, group), 4, bits)
    assert (err <= bound).all(), float((err - bound).max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("fill", [0.0, 3.25, -1e4])
def test_constant_groups_are_exact_and_finite(dtype, bits, fill):
    x = torch.full((2, 4, 8, 16), fill, dtype=dtype)
    k = dequantize_keys(*quantize_keys(x, bits, 8), bits, 8)
    v = dequantize_values(*quantize_values(x, bits, 8), bits, 8)
    for out in (k, v):
        assert torch.isfinite(out).all()
        assert torch.equal(out, x)


def test_int8_is_much_finer_than_int4():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 64, 16)
    err = {b: (dequantize_keys(*quantize_keys(x, b, 32), b, 32) - x).abs().mean().item() for b in (8, 4)}
    assert err[8] * 8 < err[4]


@pytest.mark.parametrize("bad_bits", [1, 3, 16, 0])
def test_unsupported_bits_raise(bad_bits):
    with pytest.raises(ValueError, match="bits"):
        quantize_keys(torch.randn(1, 1, 8, 16), bad_bits, 8)


def test_unsupported_dtype_and_shape_raise():
    with pytest.raises(ValueError, match="dtype"):
        quantize_values(torch.randn(1, 1, 8, 16).double(), 4, 8)
    with pytest.raises(ValueError, match=r"\[batch, kv_heads, seq, head_dim\]"):
        quantize_values(torch.randn(8, 16), 4, 8)
    with pytest.raises(ValueError, match="group_size"):
        quantize_values(torch.randn(1, 1, 8, 16), 4, 5)
    with pytest.raises(ValueError, match="group_size"):
        quantize_keys(torch.randn(1, 1, 7, 16), 4, 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_next_float_is_nextafter_for_every_finite_16_bit_float(dtype):
    """`next_float` (a step of the bit pattern, exact under inductor) equals `torch.nextafter` for all 2^16 patterns
    that are finite, both directions, zeros and subnormals included."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    x = x[torch.isfinite(x)]
    for up in (True, False):
        ref = torch.nextafter(x, torch.full_like(x, float("inf") if up else -float("inf")))
        assert torch.equal(next_float(x, up).view(torch.int16), ref.view(torch.int16))


def test_compiled_quantizer_equals_eager():
    """Inductor keeps the quantizer's rounding (the stored scale bumped up, the zero down) where its own `nextafter`
    lowering (through fp32) returned the bf16 input unchanged; with its bf16 casts emulated the codes, scales and
    zeros equal eager's bit for bit."""
    import torch._inductor.config as inductor_config

    x = torch.randn(16, 4, 32, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0)) * 3
    torch._dynamo.reset()
    with inductor_config.patch(emulate_precision_casts=True):
        compiled = torch.compile(lambda t: quantize_values(t.view(16, 4, 1, 32), 4, 32), backend="inductor")
        got = compiled(x)
    torch._dynamo.reset()
    for a, b in zip(quantize_values(x.view(16, 4, 1, 32), 4, 32), got):
        assert torch.equal(a, b)
