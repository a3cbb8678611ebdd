"""The attention bridge: how an attention function reaches the cache layer whose `update` just ran.

Attention functions never receive the cache. But every transformers decoder calls `cache.update(keys, values,
layer_idx)` right before its attention, in the same module and thread, so a cache layer can leave itself *pending*
in `update` (`expect(layer)`), and a registered wrapper of the model's attention implementation (sdpa or eager, see
`_compat.bridged_attention`) takes it back (`take(module)`) and lets it run the attention:
`layer.attend(base, module, query, key, value, attention_mask, **kwargs) -> (output, weights)`, where `base` is the
wrapped implementation's function. Two users:

- eviction (`eviction/observe.py`): runs `base`, then scores the slots from the queries, the mask and the weights;
- the fused decode path (`kernels/fused.py`): runs the Triton kernel over the packed KIVI storage instead of `base`
  over a dequantized copy (`update` then returns only the full-precision residual).

Scope: `attach(model)` switches the model to the wrapper and returns an `Attachment` (a context manager; `detach()`
is idempotent). Attachments are reference-counted per model; the last detach restores the original implementation.
Whenever no layer is pending for the module's `layer_idx` the wrapper calls `base` with the same arguments and
returns its result unchanged, so an attached model computes exactly what it computes without the bridge (with any
other cache, or none). Caches detach in `detach()` / `with cache:`; garbage collection of a cache is only a backstop.
"""

from __future__ import annotations

import threading
import weakref

import torch

from . import _compat

_local = threading.local()  # .layer: the pending layer; .memo: (mask, kv_start result) of the current forward
_attached: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> [count, original implementation]


# ---------------------------------------------------------------------------------------------- pending layer


def expect(layer, key: torch.Tensor) -> None:
    """Mark `layer` (with `layer_idx` and `attend`) as the one whose attention comes next in this thread.

    `key` is the tensor `update` returns as keys: the wrapper dispatches only to an attention that receives this very
    tensor, so a stale pending layer (its attention never ran) can never capture another model's attention.
    """
    _local.layer, _local.key = layer, key


def take(module, key: torch.Tensor):
    """The pending layer if `module` (same `layer_idx`) is attending over the keys it returned; else None."""
    layer = getattr(_local, "layer", None)
    if layer is None or key is not _local.key or getattr(module, "layer_idx", layer.layer_idx) != layer.layer_idx:
        return None
    _local.layer = _local.key = None
    return layer


def _bridged(base, module, query, key, value, attention_mask, **kwargs):
    """The registered attention function: the pending layer's `attend`, else `base` unchanged."""
    layer = take(module, key)
    if layer is None:
        return base(module, query, key, value, attention_mask, **kwargs)
    return layer.attend(base, module, query, key, value, attention_mask, **kwargs)


# ---------------------------------------------------------------------------------------------- attaching


class Attachment:
    """One reference to `model`'s bridged attention; `detach()` (idempotent) or leaving `with` gives it back."""

    def __init__(self, model):
        self._model = weakref.ref(model)
        self.active = True

    def detach(self) -> None:
        if not self.active:
            return
        self.active = False
        _release(self._model)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def attach(model, owner: str = "this cache") -> Attachment:
    """Switch `model` (a PreTrainedModel with sdpa or eager attention) to the bridge; reference-counted.

    Raises a ValueError naming `owner` if the model's attention implementation cannot be bridged.
    """
    entry = _attached.get(model)
    if entry is not None:
        entry[0] += 1
        return Attachment(model)
    current = _compat.attention_implementation(model)
    base = _compat.bridged_base(current) or current
    if base not in _compat.BRIDGEABLE_ATTENTION:
        raise ValueError(
            f"attn_implementation={current!r} is not supported by {owner} (it reaches the cache through the model's "
            f"attention); accepted values: {list(_compat.BRIDGEABLE_ATTENTION)}. Load the model with "
            "attn_implementation='sdpa'."
        )
    _compat.set_attention_implementation(model, _compat.bridged_attention(base, _bridged))
    _attached[model] = [1, current]
    return Attachment(model)


def _release(model_ref: weakref.ref) -> None:
    model = model_ref()
    entry = None if model is None else _attached.get(model)
    if entry is None:
        return
    entry[0] -= 1
    if entry[0] == 0:
        del _attached[model]
        _compat.set_attention_implementation(model, entry[1])


def is_attached(model) -> bool:
    """True while at least one attachment of `model` is alive."""
    return model in _attached


# ---------------------------------------------------------------------------------------------- masks


def kv_start_from_mask(attention_mask: torch.Tensor | None, q: int, n_keys: int):
    """Per-row first valid key for a decode kernel, if the mask is exactly what the kernel computes.

    The kernel attends query `i` of `q` to keys `kv_start[b] <= j <= n_keys - q + i` (left padding, causal among the
    last `q`). Returns `(True, None)` for no mask (no padding), `(True, kv_start int32 [B])` when the 4D mask
    (bool or additive, `[B or 1, 1, q, n_keys]`) is exactly that, else `(False, None)` (e.g. right padding, a
    custom mask): the caller then runs the base attention. Memoized per mask object, so the check (one host sync)
    runs once per forward, not once per layer.
    """
    if attention_mask is None:
        return True, None
    memo = getattr(_local, "memo", None)
    if memo is not None and memo[0] is attention_mask and memo[1] == (q, n_keys):
        return memo[2]
    result = (False, None)
    if attention_mask.dim() == 4 and attention_mask.shape[1] == 1 and tuple(attention_mask.shape[2:]) == (q, n_keys):
        m = attention_mask[:, 0]
        allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2  # additive: 0 where attended
        start = allowed[:, -1].to(torch.int32).argmax(-1)  # first attended key of the last query (all pads: 0)
        pos = torch.arange(n_keys, device=m.device)
        qpos = n_keys - q + torch.arange(q, device=m.device)
        expected = (pos[None, None, :] >= start[:, None, None]) & (pos[None, None, :] <= qpos[None, :, None])
        if torch.equal(allowed.expand_as(expected), expected):
            result = (True, start.to(torch.int32))
    _local.memo = (attention_mask, (q, n_keys), result)
    return result


__all__ = ["Attachment", "attach", "expect", "is_attached", "kv_start_from_mask", "take"]
