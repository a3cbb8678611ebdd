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
from .kernels.masks import kv_start_from_mask  # noqa: F401  (re-exported: the bridge's users check masks with it)

_local = threading.local()  # .layer / .key: the pending layer and the keys it returned
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


# ---------------------------------------------------------------------------------------------- layers


class BridgedLayerMixin:
    """The pending handshake, written once for every cache layer that attends through the bridge.

    In `update` a layer calls `expect_attention(keys)` (it is then pending); the bridge's wrapper calls `attend`,
    which clears the pending flag, runs the family's `bridged_attention(base, module, query, key, value,
    attention_mask, **kwargs) -> (output, weights)` and then records that the bridge reached this layer
    (`bridge_seen`: layers fuse, or take a compiled step, only after a forward of theirs came through the bridge, so a
    model that bypasses it never gets a residual alone). `missed_attention()` (next `update`) says whether the
    previous forward's attention bypassed the bridge; `reset_bridge()` forgets both (call it from `reset`).
    """

    _pending = False
    _bridge_seen = False

    @property
    def bridge_seen(self) -> bool:
        return self._bridge_seen

    def expect_attention(self, key: torch.Tensor) -> None:
        """Leave this layer pending for the attention over `key` (the tensor `update` returns as keys)."""
        self._pending = True
        expect(self, key)

    def attend(self, base, module, query, key, value, attention_mask, **kwargs):
        """Called by the bridge: `bridged_attention`, then `bridge_seen` (only if it returned: a refused mask is
        checked again next time)."""
        self._pending = False
        result = self.bridged_attention(base, module, query, key, value, attention_mask, **kwargs)
        self._bridge_seen = True
        return result

    def bridged_attention(self, base, module, query, key, value, attention_mask, **kwargs):
        """The family's attention (default: the model's own)."""
        return base(module, query, key, value, attention_mask, **kwargs)

    def missed_attention(self) -> bool:
        """True (once) if the last `expect_attention` was never answered; then `bridge_seen` starts over."""
        missed = self._pending
        if missed:
            self._pending = self._bridge_seen = False
        return missed

    def reset_bridge(self) -> None:
        self._pending = self._bridge_seen = False


__all__ = ["Attachment", "BridgedLayerMixin", "attach", "expect", "is_attached", "kv_start_from_mask", "take"]
