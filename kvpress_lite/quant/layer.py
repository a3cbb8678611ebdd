"""One model layer's quantized KV: a `QuantizedKV` storage (KIVI history + full-precision recent window)."""

from __future__ import annotations

import torch

from .._compat import CacheLayerMixin
from ..layer_state import BatchStateMixin
from ..storage import StorageSpec


class QuantizedKVLayer(BatchStateMixin, CacheLayerMixin):
    """KIVI-style layer (arXiv 2402.02750): keys per-channel, values per-token, recent tokens full precision.

    New tokens enter the storage's full-precision residual `[B, H, R', D]`. Whenever it holds at least
    `residual_length + group_size` tokens, its oldest whole blocks of `group_size` tokens are quantized once and
    appended to the history; quantized blocks are never re-quantized. The residual therefore holds between
    `residual_length` and `residual_length + group_size - 1` tokens.

    Args:
        bits: code width, one of 2, 4, 8 (int4/int2 are packed into bytes).
        group_size: tokens per key group and channels per value group.
        residual_length: most recent tokens always kept in full precision.
    Storage: `self.store`, a `kvpress_lite.storage.QuantizedKV`.
    """

    is_sliding = False
    is_croppable = False
    state_names = ("store",)

    def __init__(self, bits: int = 4, group_size: int = 64, residual_length: int = 128):
        super().__init__()
        self.spec = StorageSpec(bits, group_size, residual_length, key_mode="channel")
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        self._clear()

    def _clear(self) -> None:
        self.store = self.spec.new()
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    @property
    def quantized_length(self) -> int:
        """Number of tokens held in quantized blocks."""
        return self.store.quantized_length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append `[B, H, q, D]` states; return all keys/values `[B, H, T_q + R', D]` for attention."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.store.append(key_states, value_states)
        out = self.store.read()  # before the flush: this forward's tokens are read in full precision
        self.store.flush()
        return out

    def get_seq_length(self) -> int:
        """Tokens cached (quantized + residual)."""
        return self.store.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) for the mask: nothing is evicted, so offset is 0."""
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        """Drop all state; the next `update` starts from scratch."""
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` tokens, possible only while they are still in the residual."""
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        n = abs(tokens_to_remove) if tokens_to_remove < 0 else self.get_seq_length() - tokens_to_remove
        try:
            self.store.truncate(n)
        except ValueError as error:
            raise ValueError(f"crop({tokens_to_remove}): {error}") from None
