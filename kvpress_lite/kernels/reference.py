"""Torch reference of decode attention over a `PackedKV`: exact semantics, fp32 softmax, runs anywhere.

Logical keys of one row are the quantized history (`T` tokens) followed by the full-precision residual (`R'`
tokens). Query `i` of `q` sits at key position `T + R' - q + i` (causal among the last `q` keys); keys before
`kv_start[b]` (left padding) are masked. Scores are `q . k * scaling`, then `softcap * tanh(s / softcap)` when a
softcap is given (Gemma 2), then a softmax in fp32. A query row with no visible key returns zeros.

Valid-length mode (`packed.lengths`, static capacity buffers): the history/residual tensors are buffers of capacity
`T_cap` / `R_cap` of which only the first `T_valid` / `R_valid` tokens count; `T`, `R'` above become the valid lengths.
"""

from __future__ import annotations

import torch

from .layouts import to_channel_packed, unpack_tokens
from .packed import TOKEN_PACKED, PackedKV


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


def valid_history(packed: PackedKV, t: int, dequantize_keys, dequantize_values):
    """Keys and values `[B, H, t, D]` of the first `t` history tokens, through the given dequantizers
    (`fn(codes, scale, zero, bits, group_size)`): per-channel keys dequantize whole groups, then keep t tokens."""
    g, bits = packed.group_size, packed.bits
    if packed.key_per_channel:
        n = -(-t // g) * g
        keys = dequantize_keys(packed.key_codes[:, :, :n], packed.key_scale[:, :, : n // g],
                               packed.key_zero[:, :, : n // g], bits, g)[:, :, :t]
    else:
        keys = dequantize_values(packed.key_codes[:, :, :t], packed.key_scale[:, :, :t], packed.key_zero[:, :, :t],
                                 bits, g)
    if packed.value_layout == TOKEN_PACKED:  # `[B, H, D, P]` -> codes `[B, H, t, D]`, one per byte: 8-bit dequantizer
        value_codes, value_bits = unpack_tokens(packed.value_codes, bits, t), 8
    else:
        value_codes, value_bits = to_channel_packed(packed.value_codes, packed.value_layout, bits, t), bits
    values = dequantize_values(value_codes, packed.value_scale[:, :, :t], packed.value_zero[:, :, :t], value_bits, g)
    return keys, values


def _fp32_keys(codes, scale, zero, bits, g):
    return dequantize_history(codes, scale, zero, bits, g, True)


def _fp32_values(codes, scale, zero, bits, g):
    return dequantize_history(codes, scale, zero, bits, g, False)


def reference_decode_attention(query: torch.Tensor, packed: PackedKV, kv_start: torch.Tensor | None = None,
                               scaling: float | None = None, softcap: float = 0.0) -> torch.Tensor:
    """Attention of `query` `[B, H_q, q, D]` over `packed`; returns `[B, H_q, q, D]` in the query's dtype.

    GQA: query head `h` reads KV head `h // (H_q // H_kv)`. kv_start: int `[B]` or None. See the module docstring for
    positions and masking. Valid lengths are read on the host (a sync on CUDA): this is the reference, not a fast path.
    """
    return _attention(query, packed, kv_start, scaling, softcap, None, False)


def reference_decode_attention_probs(query: torch.Tensor, packed: PackedKV, kv_start: torch.Tensor | None = None,
                                     scaling: float | None = None, softcap: float = 0.0,
                                     positions: torch.Tensor | None = None):
    """(`[B, H_q, q, D]` output, fp32 `[B, H_kv, T_cap + R_cap]` probabilities): `reference_decode_attention`, plus
    each entry's attention probability summed over the query heads of its KV head and the q queries (history entries
    first, then residual entries, at their capacity indices; entries past the valid lengths or masked are 0).

    positions: None, or int `[B, H_kv, T_cap + R_cap]`, each entry's own position: an entry is attended iff
    `positions >= kv_start[b]` (0 without kv_start; -1 = empty, never), per entry, instead of the logical prefix rule
    (eviction's slots); causality among q > 1 queries still follows the logical order. What
    `triton_decode_attention(..., positions=, return_probs=True)` computes."""
    return _attention(query, packed, kv_start, scaling, softcap, positions, True)


def _attention(query, packed, kv_start, scaling, softcap, positions, return_probs):
    b, hq, nq, d = query.shape
    scaling = d ** -0.5 if scaling is None else scaling
    t_valid, r_valid = packed.valid_lengths()
    keys, values = [], []
    if t_valid > 0:
        k, v = valid_history(packed, t_valid, _fp32_keys, _fp32_values)
        keys.append(k)
        values.append(v)
    if r_valid > 0:
        keys.append(packed.residual_keys[:, :, :r_valid].float())
        values.append(packed.residual_values[:, :, :r_valid].float())
    t_cap, r_cap = packed.history_capacity, packed.residual_capacity
    if not keys:
        if packed.lengths is not None:  # capacity buffers, both valid lengths 0: no query sees a key
            out = torch.zeros_like(query)
            if return_probs:
                hkv = packed.kv_heads
                return out, torch.zeros(b, hkv, t_cap + r_cap, dtype=torch.float32, device=query.device)
            return out
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
    start = (kv_start.view(b, 1, 1, 1).to(pos.device) if kv_start is not None
             else torch.zeros(b, 1, 1, 1, dtype=torch.long, device=pos.device))
    if positions is not None:  # each entry's own position decides (the valid entries, in logical order)
        index = torch.cat([torch.arange(t_valid), t_cap + torch.arange(r_valid)]).to(positions.device)
        entry = positions.index_select(2, index)[:, :, None, :].to(pos.device)  # (B, Hkv, 1, L)
        allowed = allowed & (entry.long() >= start)
    elif kv_start is not None:
        allowed = allowed & (pos.view(1, 1, 1, -1) >= start)
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # a row with no visible key: all -inf -> NaN -> zeros
    out = torch.matmul(p, v)  # (B, Hkv, Gq*nq, D)
    out = out.reshape(b, hq, nq, d).to(query.dtype)
    if not return_probs:
        return out
    probs = torch.zeros(b, hkv, t_cap + r_cap, dtype=torch.float32, device=query.device)
    mass = p.sum(dim=2)  # (B, Hkv, L): summed over the query heads and queries
    probs[:, :, :t_valid] = mass[:, :, :t_valid]
    probs[:, :, t_cap:t_cap + r_valid] = mass[:, :, t_valid:]
    return out, probs


__all__ = ["dequantize_history", "reference_decode_attention", "reference_decode_attention_probs", "unpack_codes",
           "valid_history"]
