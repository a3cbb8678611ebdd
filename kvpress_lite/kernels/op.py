"""`quantized_decode_attention`: one op over packed KIVI storage, Triton on CUDA, the torch reference elsewhere.

Registered as `torch.ops.kvpress_lite.quantized_decode_attention` through `torch.library.custom_op` with a fake
(meta) implementation, so `torch.compile` traces through it and CUDA graphs can capture it. Triton is optional: the
Triton path runs on CUDA tensors, or on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1` set before
triton is first imported).
"""

from __future__ import annotations

import torch

from .packed import PackedKV
from .reference import reference_decode_attention
from .sdpa_path import dequantized_sdpa_attention

try:
    from . import triton_decode as _triton
    _TRITON_ERROR = None
except ImportError as exc:  # triton is an optional dependency
    _triton = None
    _TRITON_ERROR = exc

IMPLS = ("auto", "triton", "torch", "sdpa")
BITS = (2, 4, 8)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def triton_available() -> bool:
    """True if triton imported (it may still need CUDA tensors or TRITON_INTERPRET=1 to run)."""
    return _triton is not None


def _triton_refusal(query: torch.Tensor, head_dim: int, bits: int, group_size: int, per_channel: bool) -> str | None:
    """None if the Triton kernel can run on these inputs, else why not."""
    if _triton is None:
        return f"triton is not installed ({_TRITON_ERROR}); `pip install triton` or use impl='torch'"
    if not query.is_cuda and not _triton.INTERPRET:
        return (f"the Triton kernel needs CUDA tensors (got device {query.device}), or TRITON_INTERPRET=1 set before "
                "triton is imported to run it on CPU; use impl='torch' or impl='auto'")
    return _triton.supported_shape(head_dim, bits, group_size, per_channel)


@torch.library.custom_op("kvpress_lite::quantized_decode_attention", mutates_args=())
def _op(
    query: torch.Tensor,
    key_codes: torch.Tensor | None,
    key_scale: torch.Tensor | None,
    key_zero: torch.Tensor | None,
    value_codes: torch.Tensor | None,
    value_scale: torch.Tensor | None,
    value_zero: torch.Tensor | None,
    residual_keys: torch.Tensor | None,
    residual_values: torch.Tensor | None,
    kv_start: torch.Tensor | None,
    bits: int,
    group_size: int,
    key_per_channel: bool,
    scaling: float,
    softcap: float,
    impl: str,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    # `lengths` is last (default None) so positional callers (kernels/fused.py) keep working
    args = (query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, residual_keys,
            residual_values, kv_start, bits, group_size, key_per_channel, scaling, softcap)
    if impl == "torch":
        return reference_decode_attention(*args, lengths=lengths)
    if impl == "sdpa":
        return dequantized_sdpa_attention(*args, lengths=lengths)
    refusal = _triton_refusal(query, query.shape[-1], bits, group_size, key_per_channel)
    if refusal is None and (impl == "triton" or query.is_cuda):
        return launch_triton(*args, lengths=lengths)
    if impl == "triton":
        raise RuntimeError(f"impl='triton' cannot run here: {refusal}")
    return reference_decode_attention(*args, lengths=lengths)


def launch_triton(query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, residual_keys,
                  residual_values, kv_start, bits, group_size, key_per_channel, scaling, softcap, lengths=None):
    """The Triton launcher over the op's positional arguments (channel-packed codes), through a `PackedKV`."""
    packed = PackedKV(key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, residual_keys,
                      residual_values, int(bits), int(group_size), "channel" if key_per_channel else "token", lengths)
    return _triton.triton_decode_attention(query, packed, kv_start, scaling, softcap)


@_op.register_fake
def _(query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, residual_keys, residual_values,
      kv_start, bits, group_size, key_per_channel, scaling, softcap, impl, lengths=None):
    return torch.empty_like(query)


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
    impl: str = "auto",
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention of `query` over a packed KIVI history followed by a full-precision residual.

    Args:
        query: `[B, H_q, q, D]`, q <= 16 queries per row (the last q positions; causal among them), GQA
            `H_q = G_q * H_kv`.
        key_codes, value_codes: uint8 `[B, H_kv, T, D * bits / 8]` (None when T == 0), packed along head_dim,
            consecutive channels per byte, low bits first.
        key_scale, key_zero: `[B, H_kv, T / G, D]` (key_mode "channel", KIVI) or `[B, H_kv, T, D / G]` ("token").
        value_scale, value_zero: `[B, H_kv, T, D / G]`. Dequantization: x = code * scale + zero.
        residual_keys, residual_values: `[B, H_kv, R', D]` in the query's dtype, or None when R' == 0.
        kv_start: int `[B]`, first valid key of each row (left padding), or None.
        bits: 8, 4 or 2. group_size: G. scaling: multiplies q . k. softcap: Gemma-2 score cap or None.
        impl: "auto" (Triton on CUDA when installed and the shape is supported, else torch), "triton", "torch" (the
            fp32 reference), "sdpa" (the history dequantized in the cache dtype, then SDPA: the fast CPU path).
        lengths: None, or an integer `(2,)` tensor on the query's device holding `(T_valid, R_valid)` (valid-length
            mode, static buffers for torch.compile / CUDA graphs): the T and R' dimensions above are then
            capacities (`T_cap`, a multiple of G for channel keys; `R_cap`) of which only the first T_valid history
            and R_valid residual tokens are read (the rest may hold anything); positions and masks are those of the
            compact tensors of the valid tokens, values are clamped to [0, capacity], and they are read on the
            device only (no host sync, no recompile as they change).
    Returns:
        `[B, H_q, q, D]` in the query's dtype; a query row that sees no key returns zeros.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not supported; accepted values: {list(IMPLS)}")
    if bits not in BITS:
        raise ValueError(f"bits={bits!r} is not supported; accepted values: {list(BITS)}")
    if key_mode not in ("channel", "token"):
        raise ValueError(f"key_mode={key_mode!r} is not supported; accepted values: ['channel', 'token']")
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
    return _op(query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, residual_keys,
               residual_values, kv_start, int(bits), int(group_size), per_channel, float(scaling),
               float(softcap or 0.0), impl, lengths)
