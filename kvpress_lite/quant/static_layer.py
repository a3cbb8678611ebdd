"""One model layer of `StaticQuantizedKVCache`: a `StaticQuantizedKV` storage, decoded by the fused kernel."""

from __future__ import annotations

import torch

from .. import _compat
from .._compat import CacheLayerMixin
from ..attention_bridge import BridgedLayerMixin, kv_start_from_mask
from ..kernels import fused as fused_path
from ..layer_state import FixedShapeLayerMixin
from .static_storage import StaticQuantizedKV


class StaticQuantizedKVLayer(FixedShapeLayerMixin, BridgedLayerMixin, CacheLayerMixin):
    """KIVI layer with preallocated storage (arXiv 2402.02750; layout in `static_storage`).

    Two paths, chosen from shapes and flags only (never from data, so a compiled decode step has no branch):
    - host path (the prompt, any forward of more than 16 tokens, and every forward when not fused): `update` returns
      the dequantized history and the full-precision residual, the model's own attention runs over them with the mask
      transformers builds from `get_mask_sizes` = the real length; identical to `QuantizedKVLayer`.
    - step path (fused, q <= 16): `update` writes the new tokens in place and returns the residual buffers, the layer
      is left pending on the attention bridge, and `attend` runs `quantized_decode_attention` over the buffers with
      the valid lengths read on the device. The branch-free flush of the block the previous step made due runs first
      in `update` (so the kernel is the last reader of every buffer in the step: compiled graphs then write them in
      place; a flush after the kernel made inductor copy whole history buffers every step).
      `get_mask_sizes` reports `max_cache_len`, a constant, so `generate`'s compiled step keeps one shape. Needs left
      padding (checked on the host path).
    """

    is_sliding = False
    is_croppable = False
    is_compileable = True

    def __init__(self, bits: int, group_size: int, residual_length: int, max_cache_len: int | None, layer_idx: int,
                 kernel_impl: str = "auto"):
        super().__init__()
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        self.max_cache_len, self.layer_idx, self.kernel_impl = max_cache_len, layer_idx, kernel_impl
        self.attachment = None  # set by the cache when it decodes through the kernel
        self.store = None
        self.is_initialized = False

    # ------------------------------------------------------------------ transformers' layer interface
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if self.max_cache_len is None:
            raise ValueError("StaticQuantizedKVCache needs max_cache_len (or max_new_tokens) to preallocate")
        self.store = StaticQuantizedKV(self.bits, self.group_size, self.residual_length, self.max_cache_len)
        self.store.allocate(key_states)
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append `[B, H, q, D]` states; return what the attention reads (see the class docstring)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        if self._steps(q):
            self.store.flush_step()  # the previous step's due block first: see StaticQuantizedKV.flush_step
            self.store.append_step(key_states, value_states)
            self.expect_attention(self.store.keys)
            return self.store.keys, self.store.values
        if not _compat.is_compiling():
            self.store.check_input(key_states)
        out = self.store.append_host(key_states, value_states)
        if self.fused:
            self.expect_attention(out[0])
        return out

    def bridged_attention(self, base, module, query, key, value, attention_mask, **kwargs):
        """Through the bridge: the decode seam over the buffers on the step path, else `base` (after checking the
        mask is left padding + causal, which the step path assumes)."""
        if key is self.store.keys:
            if not fused_path.plain_kwargs(kwargs):
                raise ValueError(f"StaticQuantizedKVCache layer {self.layer_idx}: the model's attention asks for "
                                 f"{sorted(k for k in kwargs if kwargs[k] is not None)}; the fused decode computes "
                                 "plain softmax attention (scaling, softcap) only. Pass fused=False.")
            return fused_path.attend_static(self.store, query, attention_mask, kwargs, self.kernel_impl), None
        ok, _ = kv_start_from_mask(attention_mask, query.shape[-2], key.shape[-2])
        if not ok:
            raise ValueError(
                "StaticQuantizedKVCache decodes through the fused kernel, which supports left padding only; this "
                "prompt's attention mask is not causal + left padding (right padding, or a custom mask). Pad on the "
                "left (tokenizer.padding_side = 'left') or pass fused=False."
            )
        return base(module, query, key, value, attention_mask, **kwargs)

    def get_seq_length(self):
        """Tokens cached: a 0-dim device tensor once allocated (no host sync, as transformers' StaticLayer), else 0."""
        if not self.is_initialized:
            return 0
        return self.store.lengths.sum(dtype=torch.int64)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, 0): `max_cache_len` on the step path (one shape for every step), else the real length."""
        if self._steps(query_length):
            return self.max_cache_len, 0
        if not self.is_initialized:
            return query_length, 0
        return sum(self.store.host_lengths()) + query_length, 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def get_max_cache_shape(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        """Forget every token; buffers (and their addresses, so compiled graphs) are kept. The next forward takes the
        host path (which checks the new prompt's padding)."""
        if self.is_initialized:
            self.store.lengths.zero_()
        self.reset_bridge()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch in place for beam search."""
        if self.is_initialized:
            self.store.reorder(beam_idx)
