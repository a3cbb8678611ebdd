"""One model layer's quantized KV: a `QuantizedKV` storage (KIVI history + full-precision recent window)."""

from __future__ import annotations

import torch

from .._compat import CacheLayerMixin
from ..attention_bridge import BridgedLayerMixin
from ..kernels import fused as fused_path
from ..layer_state import BatchStateMixin
from ..storage import StorageSpec


class QuantizedKVLayer(BridgedLayerMixin, BatchStateMixin, CacheLayerMixin):
    """KIVI-style layer (arXiv 2402.02750): keys per-channel, values per-token, recent tokens full precision.

    New tokens enter the storage's full-precision residual `[B, H, R', D]`. Whenever it holds at least
    `residual_length + group_size` tokens, its oldest whole blocks of `group_size` tokens are quantized once and
    appended to the history; quantized blocks are never re-quantized. The residual therefore holds between
    `residual_length` and `residual_length + group_size - 1` tokens.

    Args:
        bits: code width, one of 2, 4, 8 (int4/int2 are packed into bytes).
        group_size: tokens per key group and channels per value group.
        residual_length: most recent tokens always kept in full precision.
        layer_idx: the model layer this cache layer serves (matched against the attention module by the bridge).
        kernel_impl: the decode implementation when fused ("auto", or a name in `kernels.names()`).
    Storage: `self.store`, a `kvpress_lite.storage.QuantizedKV`.

    Fused decoding: while `self.attachment` (an `attention_bridge.Attachment`, set by `QuantizedKVCache`) is active,
    `update` leaves the layer pending on the bridge and `attend` runs the model's attention. A decoding forward
    (q <= 16) over a non-empty history then skips the dequantization: `update` returns only the residual and `attend`
    runs `quantized_decode_attention` over the packed storage. Fusing starts only once a previous forward of this
    layer reached `attend` (so a model that bypasses the bridge never gets the residual alone), and a fused forward
    whose attention did not come through the bridge makes the next `update` raise. Flushes happen after attention,
    so this forward's tokens are read in full precision on both paths.
    """

    is_sliding = False
    is_croppable = False
    state_names = ("store",)

    def __init__(self, bits: int = 4, group_size: int = 64, residual_length: int = 128, layer_idx: int = 0,
                 kernel_impl: str = "auto"):
        super().__init__()
        self.spec = StorageSpec(bits, group_size, residual_length, key_mode="channel")
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        self.layer_idx, self.kernel_impl = layer_idx, kernel_impl
        self.attachment = None
        self._clear()

    def _clear(self) -> None:
        self.store = self.spec.new()
        self.is_initialized = False
        self._fused = False
        self.reset_bridge()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    @property
    def quantized_length(self) -> int:
        """Number of tokens held in quantized blocks."""
        return self.store.quantized_length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append `[B, H, q, D]` states; return all keys/values `[B, H, T_q + R', D]` for attention."""
        if self.missed_attention():  # the previous forward's attention did not come through the bridge
            self.store.flush()
            if self._fused:
                raise RuntimeError(
                    f"QuantizedKVLayer {self.layer_idx}: the previous decoding forward returned only the residual for "
                    "the fused kernel, but its attention did not run through kvpress_lite's attention bridge (the "
                    "cache was detached, the model's attn_implementation was changed, or another model runs the "
                    "cache). Build the cache with the model that runs it, or pass fused=False."
                )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.store.append(key_states, value_states)
        if self.attachment is not None and self.attachment.active:
            self._fused = self.bridge_seen and fused_path.fusable(self.store, key_states.shape[-2], self.kernel_impl)
            out = (self.store.keys, self.store.values) if self._fused else self.store.read()
            self.expect_attention(out[0])
            return out
        out = self.store.read()  # before the flush: this forward's tokens are read in full precision
        self.store.flush()
        return out

    def bridged_attention(self, base, module, query, key, value, attention_mask, **kwargs):
        """This layer's attention (through the bridge): the decode seam over the packed storage when `update` chose
        it, else `base` (the model's own sdpa/eager) over what `update` returned; then flush."""
        result = None
        if self._fused:
            out = fused_path.attend(self.store, query, attention_mask, kwargs, self.kernel_impl)
            if out is not None:
                result = (out, None)
            else:  # a mask/kwargs the kernel does not compute: the model's attention over a dequantized copy
                key, value = self.store.read()
        if result is None:
            result = base(module, query, key, value, attention_mask, **kwargs)
        self.store.flush()
        return result

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
