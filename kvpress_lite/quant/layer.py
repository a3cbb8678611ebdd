"""One model layer's quantized KV storage: quantized history blocks + a full-precision recent window."""

from __future__ import annotations

import torch

from .._compat import CacheLayerMixin
from ..layer_state import BatchStateMixin
from .ops import dequantize_keys, dequantize_values, quantize_keys, quantize_values


class QuantizedKVLayer(BatchStateMixin, CacheLayerMixin):
    """KIVI-style layer (arXiv 2402.02750): keys per-channel, values per-token, recent tokens full precision.

    New tokens enter the full-precision residual `keys`/`values` `[B, H, R', D]`. Whenever it holds at
    least `residual_length + group_size` tokens, its oldest whole blocks of `group_size` tokens are
    quantized once and appended to the history; quantized blocks are never re-quantized. The residual
    therefore holds between `residual_length` and `residual_length + group_size - 1` tokens.

    Args:
        bits: code width, one of 2, 4, 8 (int4/int2 are packed into bytes).
        group_size: tokens per key group and channels per value group.
        residual_length: most recent tokens always kept in full precision.
    """

    is_sliding = False
    is_croppable = False
    state_names = ("keys", "values", "key_codes", "key_scale", "key_zero", "value_codes", "value_scale", "value_zero")

    def __init__(self, bits: int = 4, group_size: int = 64, residual_length: int = 128):
        super().__init__()
        self.bits = bits
        self.group_size = group_size
        self.residual_length = residual_length
        self._clear()

    def _clear(self) -> None:
        self.keys = self.values = None
        self.key_codes = self.key_scale = self.key_zero = None
        self.value_codes = self.value_scale = self.value_zero = None
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.keys = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1]))
        self.values = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[-1]))
        self.is_initialized = True

    @property
    def quantized_length(self) -> int:
        """Number of tokens held in quantized blocks."""
        return 0 if self.key_codes is None else self.key_codes.shape[-2]

    def dequantized_history(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Transient full-precision copy of the quantized blocks, `[B, H, T_q, D]` each, or None."""
        if self.key_codes is None:
            return None
        keys = dequantize_keys(self.key_codes, self.key_scale, self.key_zero, self.bits, self.group_size)
        values = dequantize_values(self.value_codes, self.value_scale, self.value_zero, self.bits, self.group_size)
        return keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append `[B, H, q, D]` states; return all keys/values `[B, H, T_q + R' , D]` for attention."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        history = self.dequantized_history()
        if history is None:
            out_keys, out_values = self.keys, self.values
        else:
            out_keys = torch.cat([history[0], self.keys], dim=-2)
            out_values = torch.cat([history[1], self.values], dim=-2)
        self._flush_residual()
        return out_keys, out_values

    def _flush_residual(self) -> None:
        """Quantize the residual's oldest whole blocks while it exceeds `residual_length + group_size - 1`."""
        excess = self.keys.shape[-2] - self.residual_length
        n = (excess // self.group_size) * self.group_size
        if n <= 0:
            return
        k_codes, k_scale, k_zero = quantize_keys(self.keys[:, :, :n], self.bits, self.group_size)
        v_codes, v_scale, v_zero = quantize_values(self.values[:, :, :n], self.bits, self.group_size)
        if self.key_codes is None:
            self.key_codes, self.key_scale, self.key_zero = k_codes, k_scale, k_zero
            self.value_codes, self.value_scale, self.value_zero = v_codes, v_scale, v_zero
        else:
            self.key_codes = torch.cat([self.key_codes, k_codes], dim=-2)
            self.key_scale = torch.cat([self.key_scale, k_scale], dim=-2)
            self.key_zero = torch.cat([self.key_zero, k_zero], dim=-2)
            self.value_codes = torch.cat([self.value_codes, v_codes], dim=-2)
            self.value_scale = torch.cat([self.value_scale, v_scale], dim=-2)
            self.value_zero = torch.cat([self.value_zero, v_zero], dim=-2)
        # .clone() so the quantized prefix's full-precision storage is really freed (a slice would keep it alive)
        self.keys = self.keys[:, :, n:].clone()
        self.values = self.values[:, :, n:].clone()

    def get_seq_length(self) -> int:
        """Tokens cached (quantized + residual)."""
        if not self.is_initialized:
            return 0
        return self.quantized_length + self.keys.shape[-2]

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
        if n > self.keys.shape[-2]:
            raise ValueError(
                f"crop({tokens_to_remove}) would remove {n} tokens but only the last {self.keys.shape[-2]} are "
                "still in full precision; quantized blocks cannot be rolled back"
            )
        self.keys = self.keys[:, :, : self.keys.shape[-2] - n]
        self.values = self.values[:, :, : self.values.shape[-2] - n]
