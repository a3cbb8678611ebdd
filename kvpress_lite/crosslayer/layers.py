"""Cache layers of a cross-layer cache: a plain stored layer and a member of a MiniCache-merged pair.

Every layer reports the tokens seen as its length and `(length + q, 0)` as its mask sizes (nothing is evicted), so
all full-attention layers agree, as transformers requires. `read()` gives a layer's whole KV in full precision (what
its attention reads, and what a `share` consumer reads from it as producer).
"""

from __future__ import annotations

import torch

from .._compat import CacheLayerMixin
from ..layer_state import BatchStateMixin
from ..storage import StorageSpec
from .merge import MergedPair


class CrossLayer(BatchStateMixin, CacheLayerMixin):
    """Base: length bookkeeping, mask sizes, reset; subclasses implement `_update` and `read`."""

    is_sliding = False
    is_croppable = False
    is_compileable = False

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self._clear()

    def _clear(self) -> None:
        self.length = 0
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Take this forward's `[B, H, q, D]` states; return the `[B, H, length, D]` keys/values attention reads."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.length += key_states.shape[-2]
        return self._update(key_states, value_states)

    def _update(self, key_states, value_states):
        raise NotImplementedError

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All cached keys/values of this layer in full precision, `[B, H, length, D]` each."""
        raise NotImplementedError

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        """Only `crop(0)`: merged tokens cannot be split back into their layers' tokens."""
        if tokens_to_remove != 0 and self.is_initialized:
            raise ValueError(f"crop({tokens_to_remove}) is not supported by a cross-layer cache (is_croppable=False)")


class StoredLayer(CrossLayer):
    """A layer outside any pair: its own storage (full precision, or KIVI-quantized with a recent window)."""

    state_names = ("store",)

    def __init__(self, layer_idx: int, storage: StorageSpec):
        self.spec = storage
        super().__init__(layer_idx)

    def _clear(self) -> None:
        super()._clear()
        self.store = self.spec.new()

    def _update(self, key_states, value_states):
        self.store.append(key_states, value_states)
        out = self.store.read()  # before the flush: this forward's tokens are read in full precision
        self.store.flush()
        return out

    def read(self):
        return self.store.read()


class MergedLayer(CrossLayer):
    """One layer of a merged pair (a = l-1, b = l): a full-precision recent window `keys`/`values` `[B, H, R, D]`,
    plus the pair's merged tokens.

    Layer a updates before layer b in every forward; at b's update both windows hold this forward's tokens, and
    whenever they hold at least `window + block` tokens their oldest whole blocks are merged into the `MergedPair`
    (during prefill and decoding alike), leaving between `window` and `window + block - 1` tokens unmerged. Layer b
    owns the pair (lists it in `state_names`); layer a only refers to it, so beam search reorders it once.

    Args:
        layer_idx: the model layer.
        pair: the shared `MergedPair`.
        partner: None for layer a; for layer b, layer a's `MergedLayer`.
        window: most recent tokens kept unmerged.
    """

    def __init__(
        self, layer_idx: int, pair: MergedPair, partner: MergedLayer | None = None, window: int = 32, sinks: int = 0
    ):
        self.pair, self.partner, self.window, self.sinks = pair, partner, window, sinks
        self.member = 0 if partner is None else 1
        names = ("sink_keys", "sink_values", "keys", "values")
        self.state_names = names if partner is None else (*names, "pair")
        super().__init__(layer_idx)

    def _clear(self) -> None:
        super()._clear()
        self.keys = self.values = None
        self.sink_keys = self.sink_values = None
        if self.partner is not None:
            self.pair.clear()

    def _update(self, key_states, value_states):
        if self.keys is None:
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        if self.partner is not None:
            self._merge_due()
        return self.read()

    def _merge_due(self) -> None:
        a = self.partner
        if a.length != self.length:
            raise ValueError(
                f"merged layers {a.layer_idx} and {self.layer_idx} saw {a.length} and {self.length} tokens: layer "
                f"{a.layer_idx} must update before layer {self.layer_idx} in every forward"
            )
        if self.sink_keys is None and self.sinks:  # the first `sinks` tokens never merge (attention sinks)
            if self.keys.shape[-2] < self.sinks:
                return
            for layer in (a, self):
                layer.sink_keys, layer.sink_values = (
                    layer.keys[:, :, : self.sinks].clone(),
                    layer.values[:, :, : self.sinks].clone(),
                )
                layer.keys, layer.values = (
                    layer.keys[:, :, self.sinks :].clone(),
                    layer.values[:, :, self.sinks :].clone(),
                )
        block = self.pair.block
        n = (self.keys.shape[-2] - self.window) // block * block
        if n <= 0:
            return
        self.pair.merge(a.keys[:, :, :n], a.values[:, :, :n], self.keys[:, :, :n], self.values[:, :, :n])
        # .clone(): a slice would keep the merged tokens' full-precision storage alive
        a.keys, a.values = a.keys[:, :, n:].clone(), a.values[:, :, n:].clone()
        self.keys, self.values = self.keys[:, :, n:].clone(), self.values[:, :, n:].clone()

    def read(self):
        parts_k, parts_v = [self.keys], [self.values]
        if self.pair.length:
            keys, values = self.pair.restore(self.member)
            parts_k.insert(0, keys)
            parts_v.insert(0, values)
        if self.sink_keys is not None:
            parts_k.insert(0, self.sink_keys)
            parts_v.insert(0, self.sink_values)
        if len(parts_k) == 1:
            return self.keys, self.values
        return torch.cat(parts_k, dim=-2), torch.cat(parts_v, dim=-2)
