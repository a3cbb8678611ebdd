"""`StaticQuantizedKVCache`: the int4/int8 KIVI cache preallocated and compileable (CUDA graphs in `generate`)."""

from __future__ import annotations

from .._compat import static_passthrough_layer
from ..cache import CompressedCache
from ..kernels import fused as fused_path
from ..kivi import SUPPORTED_BITS
from ..registry import register
from ..sliding import StaticSlidingWindowKVLayer
from ..storage import StorageSpec, _positive_int
from .attached import FusedAttachmentMixin
from .static_layer import StaticQuantizedKVLayer


class StaticQuantizedKVCache(FusedAttachmentMixin, CompressedCache):
    """KIVI-quantized KV cache with fixed shapes: `is_compileable`, so `generate` compiles its decode step.

    Example (CUDA; `generate` compiles the decode step with CUDA graphs on its own):
        cache = StaticQuantizedKVCache(model, bits=4, max_new_tokens=256)   # or max_cache_len=prompt_len + 256
        with cache:
            out = model.generate(**inputs, max_new_tokens=256, cache=cache)

    Every full-attention layer preallocates its packed history and full-precision window for `max_cache_len`
    tokens and writes in place (`quant/static_storage.py`); sliding/chunked layers are `StaticSlidingWindowKVLayer`
    (full precision, the last `sliding_window` tokens, lengths on the device: compileable too).
    A decode step of at most 16 tokens runs `quantized_decode_attention` over each row's valid length, read on the
    device (no dense mask over the preallocated length, no host sync), so it can be captured in a CUDA graph. The
    prompt keeps the model's attention over a dequantized copy. The quantization is `QuantizedKVCache`'s, token for
    token: uncompiled and unfused (CPU default), both caches compute the same tensors.

    Args:
        model_or_config: the model (its config: never fused, not compileable).
        bits: 8, 4 or 2. group_size: tokens per key group, channels per value group (divides head_dim).
        residual_length: recent tokens kept in full precision.
        max_cache_len: tokens the cache can hold (prompt + new tokens). More raises a ValueError naming it (a
            device-side assert inside a compiled step). Give it, or `max_new_tokens` (a cache passed to `generate` is
            never told `generate`'s `max_length`).
        max_new_tokens: instead of `max_cache_len`: the first prompt sizes the cache to its length + `max_new_tokens`;
            after `reset()` a prompt that no longer fits re-sizes it (new buffers, so a new compiled graph). For many
            prompts of different lengths, one `max_cache_len` keeps one graph.
        fused: None (default: on CUDA with triton and a layout the Triton kernel supports), True (always; on CPU the
            op's "sdpa" path, compileable without CUDA graphs), False (never: the cache is then not compileable).
        kernel_impl: the fused op's implementation: "auto" (CUDA: "triton"; CPU: "sdpa"), "triton", "torch" (the fp32
            reference), "sdpa" (the valid history dequantized in the model dtype, then SDPA).
    Paper: KIVI, https://arxiv.org/abs/2402.02750
    """

    def __init__(self, model_or_config, bits: int = 4, max_cache_len: int | None = None, group_size: int = 64,
                 residual_length: int = 128, fused: bool | None = None, kernel_impl: str = "auto",
                 max_new_tokens: int | None = None):
        if bits is None or isinstance(bits, bool) or bits not in SUPPORTED_BITS:  # before StorageSpec, which takes None
            raise ValueError(f"bits={bits!r} is not supported by StaticQuantizedKVCache; accepted values: "
                             f"{list(SUPPORTED_BITS)} (transformers' StaticCache stores full precision)")
        if (max_cache_len is None) == (max_new_tokens is None):
            raise ValueError("give exactly one of max_cache_len (tokens to preallocate: prompt length + new tokens) "
                             "and max_new_tokens (the cache is then sized at its first prompt: that prompt's length + "
                             f"max_new_tokens); got max_cache_len={max_cache_len!r}, max_new_tokens={max_new_tokens!r} "
                             "(a cache passed to generate() is not told generate's max_length)")
        if max_cache_len is not None:
            _positive_int("max_cache_len", max_cache_len, 1)
        else:
            _positive_int("max_new_tokens", max_new_tokens, 1)
        self.max_new_tokens, self._refit = max_new_tokens, False
        is_model = self._check_fused_options(model_or_config, fused, kernel_impl)
        self.spec = StorageSpec(bits, group_size, residual_length, key_mode="channel")
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        self._max_cache_len, self.kernel_impl = max_cache_len, kernel_impl
        super().__init__(model_or_config)
        self.spec.check_head_dim(self.geometry.head_dim)
        if not is_model or fused is False:
            return
        device = fused_path.model_device(model_or_config)
        refusal = fused_path.static_refusal(device, self.geometry.head_dim, bits, group_size, kernel_impl)
        if refusal is not None:
            if fused:
                raise ValueError(f"fused=True cannot run on {device}: {refusal}")
            return
        if fused or device.type == "cuda":
            self._attach(model_or_config, "StaticQuantizedKVCache(fused=True)", required=bool(fused))

    def full_attention_layer(self, layer_idx: int) -> StaticQuantizedKVLayer:
        return StaticQuantizedKVLayer(self.bits, self.group_size, self.residual_length, self.max_cache_len, layer_idx,
                                      self.kernel_impl)

    def uncompressed_layer(self, layer_type: str, kwargs: dict, layer_idx: int):
        """Sliding/chunked layers: `StaticSlidingWindowKVLayer` (compileable, lengths on the device); dummy layers:
        transformers' own. (Sized with `max_new_tokens` until the first prompt sets `max_cache_len`.)"""
        length = self.max_cache_len or self.max_new_tokens
        if layer_type not in ("sliding_attention", "chunked_attention"):
            return static_passthrough_layer(layer_type, kwargs, length)
        return StaticSlidingWindowKVLayer(length, kwargs["sliding_window"], layer_idx,
                                          chunked=layer_type == "chunked_attention")

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Size the cache at its first prompt when built with `max_new_tokens`, then update layer `layer_idx`."""
        if self.max_new_tokens is not None and (self._max_cache_len is None or self._refit):
            self._refit = False
            needed = key_states.shape[-2] + self.max_new_tokens
            if self._max_cache_len is None or needed > self._max_cache_len:
                self._size_for(needed)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _size_for(self, max_cache_len: int) -> None:
        """Build every layer for `max_cache_len` tokens (before any is allocated) and hand them the attachment."""
        self._max_cache_len = max_cache_len
        self.layers = self.build_layers()
        for layer in self.layers:
            if hasattr(layer, "attachment"):
                layer.attachment = self.attachment

    def reset(self) -> None:
        """Drop every token, keeping the buffers (and compiled graphs). Built with `max_new_tokens`, the next prompt
        re-sizes the cache only if it and `max_new_tokens` no longer fit."""
        super().reset()
        if self.max_new_tokens is not None:
            self._refit = True

    @property
    def max_cache_len(self) -> int:
        """Tokens preallocated per row (prompt + new tokens)."""
        return self._max_cache_len

    @property
    def is_compileable(self) -> bool:
        """True while fused: then every decode step has fixed shapes and no host sync (what `generate` compiles)."""
        return self.fused

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_cache_len


register("quantized_static", "quantization",
         "KIVI int8/int4 with preallocated packed storage; compileable, CUDA-graph decode")(StaticQuantizedKVCache)
