"""Seeing what attention saw: the queries, the mask and (cheaply) the attention mass eviction policies rank by.

SDPA returns no attention weights, and the cache never sees queries. An `EvictionCache` therefore switches its model
to a registered wrapper of the model's own implementation (`sdpa` or `eager`, see `_compat.observed_attention`) that
runs it unchanged and then hands `(query, key, mask, weights)` to the cache layer that has just returned `key` from
`update` (models call `cache.update(...)` immediately before attention, in the same module and thread). The switch
is reference-counted per model and undone by `EvictionCache.detach()`, on leaving `with cache:`, or when the cache is
garbage-collected; while it lasts the model computes exactly what its base implementation computes.
"""

from __future__ import annotations

import threading
import weakref

import torch

from .. import _compat

_pending = threading.local()  # .layer: the EvictionLayer whose `update` ran last and awaits its attention
_attached: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> [attachments, original implementation]
QUERY_BLOCK = 256  # queries scored at once: bounds the transient to [B, H_q, 256, P] fp32 at prefill


def expect(layer) -> None:
    """Mark `layer` as waiting for the attention of the forward whose keys it just returned."""
    _pending.layer = layer


def _dispatch(module, query, key, attention_mask, weights, kwargs) -> None:
    layer = getattr(_pending, "layer", None)
    if layer is None or getattr(module, "layer_idx", layer.layer_idx) != layer.layer_idx:
        return
    _pending.layer = None
    layer.observe(query, key, attention_mask, weights, scaling=kwargs.get("scaling"), softcap=kwargs.get("softcap"))


def attach(model) -> None:
    """Switch `model` to the observed version of its attention implementation (reference-counted)."""
    entry = _attached.get(model)
    if entry is not None:
        entry[0] += 1
        return
    current = _compat.attention_implementation(model)
    base = _compat.observed_base(current) or current
    if base not in _compat.OBSERVABLE_ATTENTION:
        raise ValueError(
            f"attn_implementation={current!r} is not supported by EvictionCache (it must observe queries); "
            f"accepted values: {list(_compat.OBSERVABLE_ATTENTION)}. Load the model with attn_implementation='sdpa'."
        )
    _compat.set_attention_implementation(model, _compat.observed_attention(base, _dispatch))
    _attached[model] = [1, current]


def detach(model_ref: "weakref.ref") -> None:
    """Undo one `attach`; the last one restores the model's original attention implementation."""
    model = model_ref()
    entry = None if model is None else _attached.get(model)
    if entry is None:
        return
    entry[0] -= 1
    if entry[0] == 0:
        del _attached[model]
        _compat.set_attention_implementation(model, entry[1])


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
) -> torch.Tensor:
    """Softmax attention mass each key received, summed over the last `window` queries (None: all) and over the
    query heads of each kv head (GQA): `[B, H_kv, P]` fp32.

    Args:
        query: `[B, H_q, q, D]` rotated queries.  key: `[B, H_kv, P, D]`, the keys attention read.
        attention_mask: the 4D mask attention used, bool `[B, 1, q, P]` (sdpa) or additive float (eager), or None
            (no padding; causal when q > 1).
        weights: `[B, H_q, q, P]` probabilities returned by eager attention: reused instead of recomputed.
        query_real: `[B, q]` bool, False for pad queries, whose rows are dropped (they attend to nothing real).
    """
    B, Hq, q, D = query.shape
    Hkv, P = key.shape[1], key.shape[2]
    G = Hq // Hkv
    scaling = D**-0.5 if scaling is None else scaling
    first = 0 if window is None else max(q - window, 0)
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
        mass += probs.sum(dim=(2, 3))
    return mass
