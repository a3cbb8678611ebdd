"""`dequantized_sdpa_attention`: decode over a `PackedKV` in the cache dtype, then SDPA (the fast path on a CPU).

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
from .packed import PackedKV
from .reference import reference_decode_attention, valid_history

_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # `enable_gqa=` exists


def dequantized_sdpa_attention(query: torch.Tensor, packed: PackedKV, kv_start: torch.Tensor | None = None,
                               scaling: float | None = None, softcap: float = 0.0) -> torch.Tensor:
    """`[B, H_q, q, D]` attention of `query` `[B, H_q, q, D]` over `packed` (as `reference_decode_attention`)."""
    if softcap:
        return reference_decode_attention(query, packed, kv_start, scaling, softcap)
    t, r = packed.valid_lengths()
    keys, values = [], []
    if t > 0:
        k, v = valid_history(packed, t, dequantize_keys, dequantize_values)
        keys.append(k)
        values.append(v)
    if r > 0:
        keys.append(packed.residual_keys[:, :, :r])
        values.append(packed.residual_values[:, :, :r])
    if not keys:
        if packed.lengths is not None:  # capacity buffers, both valid lengths 0: no query sees a key
            return torch.zeros_like(query)
        raise ValueError("decode attention needs at least one key: history and residual are both empty")
    k = torch.cat(keys, dim=2).to(query.dtype)  # (B, Hkv, L, D)
    v = torch.cat(values, dim=2).to(query.dtype)
    b, hq, nq, d = query.shape
    scaling = d ** -0.5 if scaling is None else scaling
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


__all__ = ["dequantized_sdpa_attention"]
