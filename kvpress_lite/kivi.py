"""Group-wise asymmetric min-max quantization of KV tensors, KIVI layout (arXiv 2402.02750).

Keys are quantized per channel: a group is `group_size` consecutive tokens of one channel, so one
scale/zero per `[batch, head, token_block, channel]` (key outliers live in channels). Values are
quantized per token: a group is `group_size` consecutive channels of one token. Codes of `bits < 8`
are packed along the last dim, `8 // bits` codes per byte. Scale and zero are stored in the cache
dtype; codes are computed against the *stored* (rounded) scale/zero so that round-trip error stays
within half a step. A constant group gets scale 0 and decodes exactly to its value (no NaN).
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 4, 8)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes `[..., D]` in `[0, 2**bits)` into bytes `[..., D * bits // 8]`."""
    if bits == 8:
        return codes
    per_byte = 8 // bits
    grouped = codes.view(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    packed = grouped[..., 0].clone()
    for i in range(1, per_byte):
        packed |= grouped[..., i] << (bits * i)
    return packed


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: bytes `[..., P]` -> uint8 codes `[..., P * 8 // bits]`."""
    if bits == 8:
        return packed
    mask = (1 << bits) - 1
    parts = [packed & mask] + [(packed >> shift) & mask for shift in range(bits, 8, bits)]
    return torch.stack(parts, dim=-1).flatten(-2)  # (..., P, per_byte) -> (..., P * per_byte)


_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
_SMALLEST_SUBNORMAL = {torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}


def next_float(x: torch.Tensor, up: bool) -> torch.Tensor:
    """`torch.nextafter(x, +inf if up else -inf)` for finite floats, by stepping the bit pattern (infinities and NaN
    returned as they are). Exact under torch.compile too: inductor lowers `nextafter` through fp32, which for bf16 and
    fp16 returns `x` itself, so a compiled quantizer lost its rounding guarantee (codes off by one)."""
    bits = x.view(_SAME_WIDTH_INT[x.dtype])
    away_from_zero = (bits >= 0) == up  # positive and up, or negative and down: a larger magnitude
    moved = torch.where(away_from_zero, bits + 1, bits - 1).view(x.dtype)
    tiny = torch.full_like(x, _SMALLEST_SUBNORMAL[x.dtype] * (1.0 if up else -1.0))
    return torch.where(x == 0, tiny, torch.where(torch.isfinite(x), moved, x))


def _minmax_quantize(x: torch.Tensor, dim: int, bits: int, param_dtype: torch.dtype):
    """Quantize `x` with one (scale, zero) per slice along `dim`; returns uint8 codes, scale, zero.

    The stored zero is rounded down and the stored scale up (in `param_dtype`), so every value maps into
    `[0, 2**bits - 1]` without clamping and the round-trip error stays within half a stored step.
    """
    xf = x.float()
    lo = xf.amin(dim, keepdim=True)
    hi = xf.amax(dim, keepdim=True)
    qmax = (1 << bits) - 1
    zero = lo.to(param_dtype)
    zero = torch.where(zero.float() > lo, next_float(zero, up=False), zero)
    span = hi - zero.float()
    scale = (span / qmax).to(param_dtype)
    scale_up = next_float(scale, up=True)
    scale = torch.where(scale.float() * qmax < span, scale_up, scale)
    scale_f = scale.float()
    safe_scale = torch.where(scale_f > 0, scale_f, torch.ones_like(scale_f))
    codes = ((xf - zero.float()) / safe_scale).round_().clamp_(0, qmax).to(torch.uint8)
    return codes, scale, zero


def _check(x: torch.Tensor, bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; accepted values: {list(SUPPORTED_BITS)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"KV dtype {x.dtype} is not supported; accepted dtypes: {[str(d) for d in SUPPORTED_DTYPES]}")
    if x.dim() != 4:
        raise ValueError(f"KV tensors must be [batch, kv_heads, seq, head_dim], got shape {tuple(x.shape)}")
    if x.shape[-1] % (8 // bits if bits < 8 else 1):
        raise ValueError(f"head_dim={x.shape[-1]} must be divisible by {8 // bits} to pack {bits}-bit codes")


def quantize_keys(keys: torch.Tensor, bits: int, group_size: int):
    """Per-channel quantization of `keys` `[B, H, T, D]`, `T % group_size == 0`.

    Returns codes `[B, H, T, D * bits // 8]` (uint8), scale and zero `[B, H, T // group_size, D]`.
    """
    _check(keys, bits)
    b, h, t, d = keys.shape
    if t % group_size:
        raise ValueError(f"key block length {t} must be a multiple of group_size={group_size}")
    codes, scale, zero = _minmax_quantize(keys.view(b, h, t // group_size, group_size, d), 3, bits, keys.dtype)
    return pack(codes.view(b, h, t, d), bits), scale.squeeze(3), zero.squeeze(3)


def dequantize_keys(codes, scale, zero, bits: int, group_size: int) -> torch.Tensor:
    """Inverse of `quantize_keys`: returns `[B, H, T, D]` in the dtype of `scale`."""
    b, h, t, _ = codes.shape
    q = unpack(codes, bits).view(b, h, t // group_size, group_size, -1)  # (B, H, nb, G, D)
    # addcmul computes in fp32 and rounds once, with no fp32 transient (codes are exact in bf16/fp16)
    return torch.addcmul(zero.unsqueeze(3), q.to(scale.dtype), scale.unsqueeze(3)).view(b, h, t, -1)


def quantize_values(values: torch.Tensor, bits: int, group_size: int, pack_codes: bool = True):
    """Per-token quantization of `values` `[B, H, T, D]`, groups of `group_size` channels (`D % group_size == 0`).

    Returns codes `[B, H, T, D * bits // 8]` (uint8; `[B, H, T, D]`, one code per byte, with `pack_codes=False`: what
    the token-packed storages repack, kernels/layouts.py), scale and zero `[B, H, T, D // group_size]`.
    """
    _check(values, bits)
    b, h, t, d = values.shape
    if d % group_size:
        raise ValueError(f"group_size={group_size} must divide head_dim={d} (values are grouped along head_dim)")
    codes, scale, zero = _minmax_quantize(values.view(b, h, t, d // group_size, group_size), 4, bits, values.dtype)
    codes = codes.view(b, h, t, d)
    return pack(codes, bits) if pack_codes else codes, scale.squeeze(4), zero.squeeze(4)


def dequantize_values(codes, scale, zero, bits: int, group_size: int) -> torch.Tensor:
    """Inverse of `quantize_values`: returns `[B, H, T, D]` in the dtype of `scale`."""
    b, h, t, _ = codes.shape
    q = unpack(codes, bits).view(b, h, t, -1, group_size)  # (B, H, T, D/G, G)
    return torch.addcmul(zero.unsqueeze(4), q.to(scale.dtype), scale.unsqueeze(4)).view(b, h, t, -1)
