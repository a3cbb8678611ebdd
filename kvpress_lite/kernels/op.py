"""The decode op (`torch.ops.kvpress_lite.decode_attention`) and the public, validating `quantized_decode_attention`.

The op is registered through `torch.library.custom_op` with a fake (meta) implementation, so `torch.compile` traces
through it and CUDA graphs can capture it; its body runs the implementation `dispatch.select` chose at trace time. A
`PackedKV` cannot cross `torch.library`, so the op takes its tensors and static fields flat (`PackedKV.tensors()`,
`PackedKV.statics()`): the only place they are spelled out.
"""

from __future__ import annotations

import torch

from .dispatch import AUTO, DTYPES, IMPLEMENTATIONS, check_impl, decode
from .layouts import LAYOUTS, packed_columns
from .packed import CHANNEL_PACKED, KEY_MODES, TOKEN_PACKED, PackedKV


@torch.library.custom_op("kvpress_lite::decode_attention", mutates_args=())
def decode_op(
    query: torch.Tensor,
    key_codes: torch.Tensor | None,
    key_scale: torch.Tensor | None,
    key_zero: torch.Tensor | None,
    value_codes: torch.Tensor | None,
    value_scale: torch.Tensor | None,
    value_zero: torch.Tensor | None,
    residual_keys: torch.Tensor | None,
    residual_values: torch.Tensor | None,
    lengths: torch.Tensor | None,
    kv_start: torch.Tensor | None,
    positions: torch.Tensor | None,
    bits: int,
    group_size: int,
    key_mode: str,
    key_layout: str,
    value_layout: str,
    scaling: float,
    softcap: float,
    impl: str,
    return_probs: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`dispatch.decode` / `dispatch.decode_probs` under torch.compile: (output, probabilities `[B, H_kv, T_cap +
    R_cap]` fp32, or an empty `(0,)` tensor when `return_probs` is False). Without `positions` and probabilities it
    runs the implementation's plain `fn` (every implementation has one; only some have `probs_fn`)."""
    packed = PackedKV.from_parts(
        (key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, residual_keys, residual_values, lengths),
        (bits, group_size, key_mode, key_layout, value_layout))
    chosen = IMPLEMENTATIONS[impl]
    if positions is None and not return_probs:
        out, probs = chosen.fn(query, packed, kv_start, scaling, softcap), None
    else:
        out, probs = chosen.probs_fn(query, packed, kv_start, scaling, softcap, positions, return_probs)
    if probs is None:
        probs = query.new_empty((0,), dtype=torch.float32)
    return out, probs


@decode_op.register_fake
def _(query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, residual_keys, residual_values,
      *args):
    return_probs = args[-1]
    if not return_probs:
        return torch.empty_like(query), query.new_empty((0,), dtype=torch.float32)
    has_hist = key_codes is not None and value_scale is not None and value_scale.shape[2] > 0
    hkv = (key_codes if has_hist else residual_keys).shape[1]
    n = (value_scale.shape[2] if has_hist else 0) + (residual_keys.shape[2] if residual_keys is not None else 0)
    return torch.empty_like(query), query.new_empty((query.shape[0], hkv, n), dtype=torch.float32)


BITS = (2, 4, 8)
INT_DTYPES = (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)


def _check_part(name: str, x: torch.Tensor | None, shape: tuple, dtype=None) -> None:
    if x is None:
        raise ValueError(f"{name} is None but the history is not empty; expected shape {shape}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")
    if dtype is not None and x.dtype != dtype:
        raise ValueError(f"{name} has dtype {x.dtype}, expected {dtype}")


def quantized_decode_attention(
    query: torch.Tensor,
    key_codes: torch.Tensor | None = None,
    key_scale: torch.Tensor | None = None,
    key_zero: torch.Tensor | None = None,
    value_codes: torch.Tensor | None = None,
    value_scale: torch.Tensor | None = None,
    value_zero: torch.Tensor | None = None,
    residual_keys: torch.Tensor | None = None,
    residual_values: torch.Tensor | None = None,
    kv_start: torch.Tensor | None = None,
    *,
    bits: int,
    group_size: int,
    key_mode: str = "channel",
    scaling: float,
    softcap: float | None = None,
    impl: str = AUTO,
    lengths: torch.Tensor | None = None,
    value_layout: str = CHANNEL_PACKED,
) -> torch.Tensor:
    """Decode attention of `query` over a packed KIVI history followed by a full-precision residual (validated).

    A thin wrapper: checks the arguments, builds a `PackedKV` and calls `dispatch.decode`.

    Args:
        query: `[B, H_q, q, D]`, q <= 16 queries per row (the last q positions; causal among them), GQA
            `H_q = G_q * H_kv`.
        key_codes, value_codes: uint8 `[B, H_kv, T, D * bits / 8]` (None when T == 0), packed along head_dim,
            consecutive channels per byte, low bits first; with `value_layout="token"` the value codes are
            token-packed `[B, H_kv, D, P]` (P a multiple of 16 with P * 8 / bits >= T: kernels/layouts.py, what the
            storages hold).
        key_scale, key_zero: `[B, H_kv, T / G, D]` (key_mode "channel", KIVI) or `[B, H_kv, T, D / G]` ("token").
        value_scale, value_zero: `[B, H_kv, T, D / G]`. Dequantization: x = code * scale + zero.
        residual_keys, residual_values: `[B, H_kv, R', D]` in the query's dtype, or None when R' == 0.
        kv_start: int `[B]`, first valid key of each row (left padding), or None.
        bits: 8, 4 or 2. group_size: G. scaling: multiplies q . k. softcap: Gemma-2 score cap or None.
        impl: "auto" (Triton on CUDA when installed and the shape is supported, else the sdpa path), "triton",
            "torch" (the fp32 reference), "sdpa" (the history dequantized in the cache dtype, then SDPA).
        lengths: None, or an integer `(2,)` tensor on the query's device holding `(T_valid, R_valid)` (valid-length
            mode, static buffers for torch.compile / CUDA graphs): the T and R' dimensions above are then
            capacities of which only the first T_valid history and R_valid residual tokens are read; values are
            clamped to [0, capacity].
        value_layout: "channel" (default) or "token": how `value_codes` are packed (above).
    Returns:
        `[B, H_q, q, D]` in the query's dtype; a query row that sees no key returns zeros.
    """
    check_impl(impl)
    if bits not in BITS:
        raise ValueError(f"bits={bits!r} is not supported; accepted values: {list(BITS)}")
    if key_mode not in KEY_MODES:
        raise ValueError(f"key_mode={key_mode!r} is not supported; accepted values: {list(KEY_MODES)}")
    if value_layout not in LAYOUTS:
        raise ValueError(f"value_layout={value_layout!r} is not supported; accepted values: {list(LAYOUTS)}")
    if query.dim() != 4 or query.dtype not in DTYPES:
        raise ValueError(f"query must be [B, H_q, q, D] in one of {[str(d) for d in DTYPES]}, got "
                         f"{tuple(query.shape)} {query.dtype}")
    b, hq, nq, d = query.shape
    if not 1 <= nq <= 16:
        raise ValueError(f"query length q={nq} is not supported; accepted values: 1..16 (decode)")
    if group_size < 1 or d % group_size:
        raise ValueError(f"group_size={group_size} must divide head_dim={d}")
    has_hist = key_codes is not None and key_codes.shape[2] > 0
    has_res = residual_keys is not None and residual_keys.shape[2] > 0
    if not has_hist and not has_res:
        raise ValueError("decode attention needs at least one key: history and residual are both empty")
    hkv = (key_codes if has_hist else residual_keys).shape[1]
    if hq % hkv:
        raise ValueError(f"query heads H_q={hq} must be a multiple of KV heads H_kv={hkv}")
    per_channel = key_mode == "channel"
    if has_hist:
        t = key_codes.shape[2]
        if per_channel and t % group_size:
            raise ValueError(f"per-channel keys need T={t} quantized tokens to be a multiple of "
                             f"group_size={group_size}")
        codes_shape = (b, hkv, t, d * bits // 8)
        _check_part("key_codes", key_codes, codes_shape, torch.uint8)
        if value_layout == TOKEN_PACKED:  # [B, H, D, P]: T comes from value_scale, P from the capacity
            p = value_codes.shape[-1] if value_codes is not None and value_codes.dim() == 4 else -1
            if p < packed_columns(t, bits) or p % 16:
                p = packed_columns(t, bits)
            _check_part("value_codes", value_codes, (b, hkv, d, p), torch.uint8)
        else:
            _check_part("value_codes", value_codes, codes_shape, torch.uint8)
        token_shape = (b, hkv, t, d // group_size)
        key_param = (b, hkv, t // group_size, d) if per_channel else token_shape
        for name, x, shape in (("key_scale", key_scale, key_param), ("key_zero", key_zero, key_param),
                               ("value_scale", value_scale, token_shape), ("value_zero", value_zero, token_shape)):
            _check_part(name, x, shape)
    else:
        key_codes = key_scale = key_zero = value_codes = value_scale = value_zero = None
    if has_res:
        r = residual_keys.shape[2]
        _check_part("residual_keys", residual_keys, (b, hkv, r, d), query.dtype)
        _check_part("residual_values", residual_values, (b, hkv, r, d), query.dtype)
    else:
        residual_keys = residual_values = None
    if kv_start is not None and tuple(kv_start.shape) != (b,):
        raise ValueError(f"kv_start must have shape ({b},), got {tuple(kv_start.shape)}")
    if lengths is not None and (not isinstance(lengths, torch.Tensor) or tuple(lengths.shape) != (2,)
                                or lengths.dtype not in INT_DTYPES or lengths.device != query.device):
        got = (f"{tuple(lengths.shape)} {lengths.dtype} on {lengths.device}" if isinstance(lengths, torch.Tensor)
               else type(lengths).__name__)
        raise ValueError(f"lengths must be None or a tensor of shape (2,) = (T_valid, R_valid) with an integer dtype "
                         f"({[str(x) for x in INT_DTYPES]}) on the query's device {query.device}; got {got}")
    packed = PackedKV(key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, residual_keys,
                      residual_values, bits=int(bits), group_size=int(group_size), key_mode=key_mode, lengths=lengths,
                      value_layout=value_layout)
    return decode(query, packed, kv_start, scaling, softcap, impl)


__all__ = ["decode_op", "quantized_decode_attention"]
