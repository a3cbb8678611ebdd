"""`dequantized_sdpa_attention`: the decode op's fast path on a CPU (impl "sdpa").

The valid history is dequantized in the cache dtype with KIVI's own dequantizers (`kvpress_lite.kivi`, the math of
`QuantizedKVCache`'s unfused path), then torch's `scaled_dot_product_attention` runs over it and the residual. Same
semantics as `reference.reference_decode_attention` (positions, causality among the last q queries, left padding,
valid lengths), computed in the cache dtype instead of fp32, so several times faster on a CPU. A score cap (Gemma 2)
is not an SDPA feature: with `softcap` it runs the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kivi import dequantize_keys, dequantize_values
from .reference import reference_decode_attention, valid_lengths

_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # `enable_gqa=` exists


def dequantized_sdpa_attention(query, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero,
                               residual_keys, residual_values, kv_start, bits: int, group_size: int,
                               key_per_channel: bool, scaling: float, softcap: float = 0.0,
                               lengths: torch.Tensor | None = None) -> torch.Tensor:
    """`[B, H_q, q, D]` attention of `query` over history + residual; arguments as `reference_decode_attention`."""
    if softcap:
        return reference_decode_attention(query, key_codes, key_scale, key_zero, value_codes, value_scale,
                                          value_zero, residual_keys, residual_values, kv_start, bits, group_size,
                                          key_per_channel, scaling, softcap, lengths=lengths)
    t, r = valid_lengths(key_codes, residual_keys, lengths)
    keys, values = [], []
    if t > 0:
        g = group_size
        if key_per_channel:  # whole key groups, then the first t tokens
            n = -(-t // g) * g
            keys.append(dequantize_keys(key_codes[:, :, :n], key_scale[:, :, : n // g], key_zero[:, :, : n // g],
                                        bits, g)[:, :, :t])
        else:
            keys.append(dequantize_values(key_codes[:, :, :t], key_scale[:, :, :t], key_zero[:, :, :t], bits, g))
        values.append(dequantize_values(value_codes[:, :, :t], value_scale[:, :, :t], value_zero[:, :, :t], bits, g))
    if r > 0:
        keys.append(residual_keys[:, :, :r])
        values.append(residual_values[:, :, :r])
    if not keys:
        if lengths is not None:  # capacity buffers, both valid lengths 0: no query sees a key
            return torch.zeros_like(query)
        raise ValueError("decode attention needs at least one key: history and residual are both empty")
    k = torch.cat(keys, dim=2).to(query.dtype)  # (B, Hkv, L, D)
    v = torch.cat(values, dim=2).to(query.dtype)
    b, hq, nq, _ = query.shape
    n, hkv = k.shape[2], k.shape[1]
    mask = None
    if nq > 1 or kv_start is not None:
        pos = torch.arange(n, device=query.device)
        qpos = n - nq + torch.arange(nq, device=query.device)
        mask = (pos[None, :] <= qpos[:, None])[None, None].expand(b, 1, nq, n)
        if kv_start is not None:
            mask = mask & (pos.view(1, 1, 1, -1) >= kv_start.view(b, 1, 1, 1).to(pos.device))
    if hq != hkv and _SDPA_GQA:
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
    else:
        rep = hq // hkv
        out = F.scaled_dot_product_attention(query, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                             attn_mask=mask, scale=scaling)
    if mask is not None:  # a query row that sees no key returns zeros (SDPA gives NaN there)
        out = out.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return out
