"""`StaticQuantizedKVCache`: the int4/int8 KIVI cache preallocated and compileable (CUDA graphs in `generate`)."""

from __future__ import annotations

from .._compat import static_passthrough_layer
from ..cache import CompressedCache
from ..kernels import fused as fused_path
from ..registry import register
from ..storage import StorageSpec, _positive_int
from .attached import FusedAttachmentMixin
from .static_layer import StaticQuantizedKVLayer
from .static_sliding import StaticSlidingWindowKVLayer


class StaticQuantizedKVCache(FusedAttachmentMixin, CompressedCache):
    """KIVI-quantized KV cache with fixed shapes: `is_compileable`, so `generate` compiles its decode step.

    Example (CUDA; `generate` compiles the decode step with CUDA graphs on its own):
        cache = StaticQuantizedKVCache(model, bits=4, max_cache_len=prompt_len + max_new_tokens)
        with cache:
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, cache=cache)

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
        max_cache_len: tokens the cache can hold (prompt + new tokens); required (a cache passed to `generate` is not
            told its `max_length`). More raises a ValueError naming it (a device-side assert inside a compiled step).
        fused: None (default: on CUDA with triton and a layout the Triton kernel supports), True (always; on CPU the
            op's torch reference, compileable without CUDA graphs), False (never: the cache is then not compileable).
        kernel_impl: the fused op's implementation: "auto" (CUDA: "triton"; CPU: "sdpa"), "triton", "torch" (the fp32
            reference), "sdpa" (the valid history dequantized in the model dtype, then SDPA).
    Paper: KIVI, https://arxiv.org/abs/2402.02750
    """

    def __init__(self, model_or_config, bits: int = 4, max_cache_len: int | None = None, group_size: int = 64,
                 residual_length: int = 128, fused: bool | None = None, kernel_impl: str = "auto"):
        if bits is None:
            raise ValueError("bits=None is not supported by StaticQuantizedKVCache; accepted values: [2, 4, 8] "
                             "(transformers' StaticCache stores full precision)")
        if max_cache_len is None:
            raise ValueError("max_cache_len is required: the number of tokens to preallocate, prompt length + "
                             "max_new_tokens (a cache passed to generate() is not told generate's max_length)")
        _positive_int("max_cache_len", max_cache_len, 1)
        fused_path.check_options(fused, kernel_impl)
        is_model = hasattr(model_or_config, "set_attn_implementation")
        if fused and not is_model:
            raise ValueError("fused=True needs the model: StaticQuantizedKVCache(model, ...) (a config has no "
                             "attention to attach the fused kernel to)")
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
        transformers' own."""
        if layer_type not in ("sliding_attention", "chunked_attention"):
            return static_passthrough_layer(layer_type, kwargs, self.max_cache_len)
        return StaticSlidingWindowKVLayer(self.max_cache_len, kwargs["sliding_window"], layer_idx,
                                          chunked=layer_type == "chunked_attention")

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
