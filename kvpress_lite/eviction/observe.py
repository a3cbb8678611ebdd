"""Seeing what attention saw: the queries, the mask and (cheaply) the attention mass eviction policies rank by.

SDPA returns no attention weights, and the cache never sees queries. An `EvictionLayer` therefore leaves itself
pending on `kvpress_lite.attention_bridge` in `update` (`expect_attention`), and the bridge's wrapper of the model's
own attention (`sdpa` or `eager`), installed by `EvictionCache` (`attention_bridge.attach`), runs the layer's
`bridged_attention`, i.e. `attend` here: the model's attention (or, for a quantized store while decoding with a policy
that needs no attention, the fused kernel over the packed storage), then `layer.observe(query, key, mask, weights)`.
While no layer is pending the wrapper computes exactly what its base implementation computes.
"""

from __future__ import annotations

import torch

from ..kernels import fused as fused_path

QUERY_BLOCK = 256  # queries scored at once: bounds the transient to [B, H_q, 256, P] fp32 at prefill


def attend(layer, base, module, query, key, value, attention_mask, **kwargs):
    """What the bridge runs for one pending `EvictionLayer` forward (its `bridged_attention`): attention (the fused
    kernel when `update` chose it, see `fuses`), then `layer.observe(query, key, mask, weights)`."""
    output, weights, mass = None, None, None
    if layer._fused and layer.policy.uses_attention:  # the kernel's pass also gives every slot's probability
        fused = fused_path.attend_probs(layer.store, query, attention_mask, kwargs, layer.fused_decode[1])
        output, mass = fused if fused is not None else (None, None)
    elif layer._fused:
        output = fused_path.attend(layer.store, query, attention_mask, kwargs, layer.fused_decode[1])
    if layer._fused and output is None:  # a mask/kwargs the kernel does not compute: base attention over a copy
        key, value = layer.store.read()
    if output is None and layer.policy.uses_attention and one_pass(query, kwargs):
        output, weights = decode_attention(query, key, value, attention_mask, kwargs.get("scaling"),
                                           kwargs.get("softcap"))
    if output is None:
        output, weights = base(module, query, key, value, attention_mask, **kwargs)
    layer.observe(query, key, attention_mask, weights, scaling=kwargs.get("scaling"), softcap=kwargs.get("softcap"),
                  mass=mass)
    return output, weights


def one_pass(query: torch.Tensor, kwargs: dict) -> bool:
    """True if this forward's attention can be `decode_attention`: one query token (a decode step; a prompt's
    `[q, P]` probabilities would not fit), plain softmax attention (scaling, softcap) and no variant it does not
    compute (dropout, sliding window, attention sinks, position bias)."""
    return query.shape[-2] == 1 and fused_path.plain_kwargs(kwargs)


def decode_attention(query, key, value, attention_mask=None, scaling=None, softcap=None):
    """A decode step's attention and its probabilities in one pass (the model's SDPA would return no probabilities,
    so attention-ranked policies would compute the logits a second time; on a GPU, SDPA with a mask whose key length
    changes every step also re-plans its cuDNN kernel every step).

    Args: `query` `[B, H_q, q, D]`, `key`/`value` `[B, H_kv, P, D]` (grouped-query heads read their KV head without a
    `repeat_kv` copy), `attention_mask` bool `[B, 1, q, P]` (True = attend), additive float, or None.
    Returns: output `[B, q, H_q, D]` (what the model's attention functions return) and fp32 probabilities
    `[B, H_q, q, P]`.
    """
    B, Hq, q, D = query.shape
    Hkv, P = key.shape[1], key.shape[2]
    scaling = D**-0.5 if scaling is None else scaling
    grouped = query.reshape(B * Hkv, (Hq // Hkv) * q, D)  # query head h reads kv head h // G
    keys_t = key.reshape(B * Hkv, P, D).transpose(1, 2)
    if softcap is None:  # the scale in the product's epilogue (beta=0: the first operand is only read for its shape)
        logits = torch.baddbmm(_zeros_like_product(grouped, P), grouped, keys_t, beta=0, alpha=scaling)
    else:
        logits = torch.bmm(grouped, keys_t).float() * scaling
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits.view(B, Hq, q, P)
    if attention_mask is not None:
        mask = attention_mask[..., :P]
        if mask.dtype == torch.bool:
            logits = torch.where(mask, logits, float("-inf"))
        else:
            logits = logits + mask
    probs = logits.softmax(dim=-1, dtype=torch.float32)  # fp32 whatever the logits' dtype (one kernel)
    out = torch.matmul(probs.to(value.dtype).view(B, Hkv, (Hq // Hkv) * q, P), value)  # (B, Hkv, G q, D)
    return out.view(B, Hq, q, D).transpose(1, 2).contiguous(), probs


def _zeros_like_product(grouped: torch.Tensor, P: int) -> torch.Tensor:
    """A `[B * H_kv, G q, P]` operand that `baddbmm(beta=0)` ignores: a broadcast 0-dim tensor (no allocation, no
    kernel; cached per device and dtype)."""
    key = (grouped.device, grouped.dtype)
    zero = _ZEROS.get(key)
    if zero is None:
        zero = _ZEROS[key] = torch.zeros((), device=grouped.device, dtype=grouped.dtype)
    return zero.expand(grouped.shape[0], grouped.shape[1], P)


_ZEROS: dict = {}


def fuses(layer, q: int) -> bool:
    """True if `layer`'s forward of `q` queries should run the fused kernel over its quantized store.

    Policies that need no attention scores (knorm, streaming, random): any forward the kernel decodes (q <= 16).
    Attention-ranked policies that sum attention (h2o, tova, snapkv): decode steps (q == 1) through an implementation
    that also returns each slot's probability (`fused.probs_fusable`: the Triton kernel on CUDA), so the step reads
    the packed slots once and never dequantizes them. Enabled per layer by `EvictionCache`
    (`layer.fused_decode = (attachment, kernel_impl)`).
    """
    options = getattr(layer, "fused_decode", None)
    if options is None or not options[0].active:
        return False
    if layer.policy.uses_attention:  # the kernel sums probabilities over query heads: not KVzip's max
        return layer.policy.attention_reduce == "sum" and fused_path.probs_fusable(layer.store, q, options[1])
    return fused_path.fusable(layer.store, q, options[1])


def real_keys(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """`[B, P]` bool, True where a key is a real token, from the 4D mask's last query row; None: no padding.

    With left padding the last query may attend to every real key, so its row is exactly the padding mask (a chunk
    whose last query is itself a pad holds only pads, and its row is all False, as it should be).
    """
    if attention_mask is None:
        return None
    row = attention_mask[:, 0, -1, :]  # [B, P]
    if row.dtype == torch.bool:
        return row
    return row > torch.finfo(row.dtype).min / 2  # eager: additive mask, 0 where attended


def _allowed(attention_mask, start: int, stop: int, q: int, P: int, device) -> torch.Tensor | None:
    """`[B or 1, 1, 1, n, P]` bool of which keys queries `start:stop` (of `q`) may attend to; None: all of them."""
    if attention_mask is not None:
        rows = attention_mask[:, :, start:stop, :]
        allowed = rows if rows.dtype == torch.bool else rows > torch.finfo(rows.dtype).min / 2
        return allowed.unsqueeze(2)
    if q == 1:
        return None
    # no mask: plain causal attention, aligned bottom-right (query i sits at key P - q + i)
    query_pos = torch.arange(start, stop, device=device) + (P - q)
    return (torch.arange(P, device=device)[None, :] <= query_pos[:, None]).view(1, 1, 1, stop - start, P)


def attention_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    scaling: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
    query_real: torch.Tensor | None = None,
    reduce: str = "sum",
) -> torch.Tensor:
    """Softmax attention mass each key received, summed over the last `window` queries (None: all) and over the
    query heads of each kv head (GQA): `[B, H_kv, P]` fp32.

    Args:
        query: `[B, H_q, q, D]` rotated queries.  key: `[B, H_kv, P, D]`, the keys attention read.
        attention_mask: the 4D mask attention used, bool `[B, 1, q, P]` (sdpa) or additive float (eager), or None
            (no padding; causal when q > 1).
        weights: `[B, H_q, q, P]` probabilities returned by eager attention: reused instead of recomputed.
        query_real: `[B, q]` bool, False for pad queries, whose rows are dropped (they attend to nothing real).
        reduce: "sum" (attention mass) or "max" (the largest probability any of those queries and heads gave the key,
            KVzip's score).
    """
    B, Hq, q, D = query.shape
    Hkv, P = key.shape[1], key.shape[2]
    G = Hq // Hkv
    scaling = D**-0.5 if scaling is None else scaling
    first = 0 if window is None else max(q - window, 0)
    if weights is not None and q == 1 and query_real is None and reduce == "sum":  # a decode step: one reduction
        return weights.view(B, Hkv, G, P).sum(dim=2, dtype=torch.float32)
    mass = torch.zeros(B, Hkv, P, dtype=torch.float32, device=key.device)
    keys_t = key.transpose(-1, -2)  # (B, Hkv, D, P); a plain 4D matmul (a broadcast 5D one is ~12x slower on CPU)
    for start in range(first, q, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, q)
        n = stop - start
        if weights is not None:
            probs = weights[:, :, start:stop].float().view(B, Hkv, G, n, P)
        else:
            grouped = query[:, :, start:stop].reshape(B, Hkv, G * n, D)  # query head h = kv head h // G
            logits = torch.matmul(grouped, keys_t).view(B, Hkv, G, n, P).float() * scaling
            if softcap is not None:
                logits = softcap * torch.tanh(logits / softcap)
            allowed = _allowed(attention_mask, start, stop, q, P, key.device)
            if allowed is not None:
                logits = logits.masked_fill(~allowed, float("-inf"))
            probs = logits.softmax(dim=-1)  # (B, Hkv, G, n, P); NaN on fully masked (pad) rows, dropped below
        if query_real is not None:
            probs = torch.where(query_real[:, None, None, start:stop, None], probs, 0.0)
        if reduce == "max":
            mass = torch.maximum(mass, probs.amax(dim=(2, 3)))
        else:
            mass += probs.sum(dim=(2, 3))
    return mass


def recent_queries(previous: torch.Tensor | None, query: torch.Tensor, window: int) -> torch.Tensor:
    """The `window` most recent rotated queries `[B, H_q, <= window, D]`: `previous` then this forward's `query`
    `[B, H_q, q, D]`, cut to the last `window` (a compact copy, so the forward's queries are not kept alive)."""
    recent = query if previous is None else torch.cat([previous, query], dim=2)
    return recent[:, :, -window:].clone()
