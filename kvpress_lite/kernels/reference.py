"""Torch reference of decode attention over packed KIVI storage: exact semantics, fp32 softmax, runs anywhere.

Logical keys of one row are the quantized history (`T` tokens) followed by the full-precision residual (`R'`
tokens). Query `i` of `q` sits at key position `T + R' - q + i` (causal among the last `q` keys); keys before
`kv_start[b]` (left padding) are masked. Scores are `q . k * scaling`, then `softcap * tanh(s / softcap)` when a
softcap is given (Gemma 2), then a softmax in fp32. A query row with no visible key returns zeros.

Valid-length mode (`lengths`, static capacity buffers): the history/residual tensors are buffers of capacity
`T_cap` / `R_cap` of which only the first `T_valid` / `R_valid` tokens count; `T`, `R'` above become the valid lengths.
"""

from __future__ import annotations

import torch


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 bytes `[..., P]` -> codes `[..., P * 8 // bits]` (consecutive channels per byte, low bits first)."""
    if bits == 8:
        return packed
    mask = (1 << bits) - 1
    parts = [(packed >> shift) & mask for shift in range(0, 8, bits)]
    return torch.stack(parts, dim=-1).flatten(-2)


def dequantize_history(codes, scale, zero, bits: int, group_size: int, per_channel: bool) -> torch.Tensor:
    """Dequantize `[B, H, T, D*bits/8]` codes to fp32 `[B, H, T, D]`: x = code * scale + zero.

    per_channel: scale/zero `[B, H, T/G, D]` (one per channel and group of G tokens, KIVI keys); otherwise
    `[B, H, T, D/G]` (one per token and group of G channels: KIVI values, per-token keys).
    """
    q = unpack_codes(codes, bits).float()
    if per_channel:
        s = scale.float().repeat_interleave(group_size, dim=2)
        z = zero.float().repeat_interleave(group_size, dim=2)
    else:
        s = scale.float().repeat_interleave(group_size, dim=3)
        z = zero.float().repeat_interleave(group_size, dim=3)
    return q * s + z


def valid_lengths(key_codes, residual_keys, lengths) -> tuple[int, int]:
    """(T, R) tokens to read: the buffers' lengths, or `lengths` (read on the host) clamped to them."""
    t_cap = key_codes.shape[2] if key_codes is not None else 0
    r_cap = residual_keys.shape[2] if residual_keys is not None else 0
    if lengths is None:
        return t_cap, r_cap
    lt, lr = (int(x) for x in lengths.tolist())
    return min(max(lt, 0), t_cap), min(max(lr, 0), r_cap)


def reference_decode_attention(
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
    softcap: float = 0.0,
    lengths: torch.Tensor | None = None,
    value_layout: str = "channel",
) -> torch.Tensor:
    """Attention of `query` `[B, H_q, q, D]` over history + residual; returns `[B, H_q, q, D]` in query's dtype.

    GQA: query head `h` reads KV head `h // (H_q // H_kv)`. See the module docstring for positions and masking.
    lengths: None, or int `(2,)` = `(T_valid, R_valid)`: only the first T_valid history tokens (of capacity
    `key_codes.shape[2]`) and R_valid residual tokens (of `residual_keys.shape[2]`) are read; values are clamped to
    [0, capacity]. Read on the host (a sync on CUDA): this is the reference, not the fast path.
    value_layout: layout of `value_codes` (`kernels.layouts`: "channel" `[B, H, T, D*bits/8]` or "token"
    `[B, H, D, P]`); converted to the channel layout here.
    """
    b, hq, nq, d = query.shape
    t_valid, r_valid = valid_lengths(key_codes, residual_keys, lengths)
    if t_valid > 0 and value_layout != "channel":
        from .layouts import to_channel_packed

        value_codes = to_channel_packed(value_codes, value_layout, bits, t_valid)
    keys, values = [], []
    if t_valid > 0:
        # per-channel keys: whole key groups (T_cap is a multiple of G), then the first T_valid tokens
        n_param = -(-t_valid // group_size) if key_per_channel else t_valid
        n_codes = n_param * group_size if key_per_channel else t_valid
        keys.append(dequantize_history(key_codes[:, :, :n_codes], key_scale[:, :, :n_param], key_zero[:, :, :n_param],
                                       bits, group_size, key_per_channel)[:, :, :t_valid])
        values.append(dequantize_history(value_codes[:, :, :t_valid], value_scale[:, :, :t_valid],
                                         value_zero[:, :, :t_valid], bits, group_size, False))
    if r_valid > 0:
        keys.append(residual_keys[:, :, :r_valid].float())
        values.append(residual_values[:, :, :r_valid].float())
    if not keys:
        if lengths is not None:  # capacity buffers, both valid lengths 0: no query sees a key
            return torch.zeros_like(query)
        raise ValueError("decode attention needs at least one key: history and residual are both empty")
    k = torch.cat(keys, dim=2)  # (B, Hkv, L, D)
    v = torch.cat(values, dim=2)
    hkv, length = k.shape[1], k.shape[2]
    gq = hq // hkv
    q = query.float().reshape(b, hkv, gq * nq, d)  # rows (h_local, i)
    s = torch.matmul(q, k.transpose(-1, -2)) * scaling  # (B, Hkv, Gq*nq, L)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    pos = torch.arange(length, device=query.device)
    qpos = length - nq + torch.arange(nq, device=query.device).repeat(gq)  # (Gq*nq,)
    allowed = pos[None, :] <= qpos[:, None]  # (Gq*nq, L)
    allowed = allowed.expand(b, 1, -1, -1)
    if kv_start is not None:
        allowed = allowed & (pos.view(1, 1, 1, -1) >= kv_start.view(b, 1, 1, 1).to(pos.device))
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # a row with no visible key: all -inf -> NaN -> zeros
    out = torch.matmul(p, v)  # (B, Hkv, Gq*nq, D)
    return out.reshape(b, hq, nq, d).to(query.dtype)
