"""`QuantizedKVCache`: int8/int4 (and int2) KIVI-style KV cache for `model.generate`."""

from __future__ import annotations

from ..cache import CompressedCache
from ..kernels import fused as fused_path
from ..kivi import SUPPORTED_BITS
from ..registry import register
from ..storage import StorageSpec
from .attached import FusedAttachmentMixin
from .layer import QuantizedKVLayer
from .static_cache import StaticQuantizedKVCache


class QuantizedKVCache(FusedAttachmentMixin, CompressedCache):
    """Quantized KV cache: full-attention layers store KIVI-layout codes, sliding layers keep their window.

    Example: `model.generate(**inputs, cache=QuantizedKVCache(model, bits=4))`.

    Fused decoding needs the model: built from a model on CUDA (with triton installed), the cache attaches to the
    model's attention through `kvpress_lite.attention_bridge`, and decoding forwards (q <= 16) run the Triton kernel
    over the packed codes (`kvpress_lite.kernels`) instead of attention over a dequantized copy of the history; the
    prompt's forward keeps the model's attention. Built from a config there is no model to attach to, and every
    forward dequantizes (the torch path). `detach()` or `with cache:` gives the model back its attention
    implementation (meanwhile the model computes exactly what it computes without the bridge, with any cache).

    Compiled decoding (CUDA): give the generation length, `QuantizedKVCache(model, bits=4, max_new_tokens=256)` (or
    `max_cache_len=`), and the constructor returns a `StaticQuantizedKVCache` instead: the same quantization token for
    token, preallocated, so `generate` compiles its decode step (CUDA graphs). Without a length the cache grows as it
    goes and decodes uncompiled.

    Args:
        model_or_config: the model (or its `PreTrainedConfig`: no fused path) the cache will run with.
        bits: 8, 4 or 2. Bytes/element ~ bits/8 + 4/group_size (16-bit scale and zero).
        group_size: tokens per key group, channels per value group; must divide head_dim.
        residual_length: most recent tokens kept in full precision (>= 0).
        fused: None (default: fused when the model is on CUDA and triton imports), True (always, given the model;
            on CPU the op runs `kernel_impl`), False (never).
        kernel_impl: the decode implementation when fused: "auto" (Triton on CUDA, the sdpa path elsewhere), or a
            name in `kvpress_lite.kernels.names()` ("triton", "sdpa", "torch": the fp32 reference).
        max_new_tokens, max_cache_len: give one to get the preallocated, compileable `StaticQuantizedKVCache`.
    Paper: KIVI, https://arxiv.org/abs/2402.02750
    """

    def __new__(cls, model_or_config=None, bits: int = 4, group_size: int = 64, residual_length: int = 128,
                fused: bool | None = None, kernel_impl: str = "auto", max_new_tokens: int | None = None,
                max_cache_len: int | None = None):
        """`StaticQuantizedKVCache(...)` when a length is given (see the class docstring), else a growing cache."""
        if cls is QuantizedKVCache and (max_new_tokens is not None or max_cache_len is not None):
            return StaticQuantizedKVCache(model_or_config, bits=bits, group_size=group_size,
                                          residual_length=residual_length, fused=fused, kernel_impl=kernel_impl,
                                          max_new_tokens=max_new_tokens, max_cache_len=max_cache_len)
        return super().__new__(cls)

    def __init__(self, model_or_config, bits: int = 4, group_size: int = 64, residual_length: int = 128,
                 fused: bool | None = None, kernel_impl: str = "auto", max_new_tokens: int | None = None,
                 max_cache_len: int | None = None):
        if bits is None or isinstance(bits, bool) or bits not in SUPPORTED_BITS:  # before StorageSpec, which takes None
            raise ValueError(f"bits={bits!r} is not supported by QuantizedKVCache; accepted values: "
                             f"{list(SUPPORTED_BITS)} (use the `dynamic` strategy for full precision)")
        is_model = self._check_fused_options(model_or_config, fused, kernel_impl)
        self.spec = StorageSpec(bits, group_size, residual_length, key_mode="channel")
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        self.kernel_impl = kernel_impl
        super().__init__(model_or_config)
        self.spec.check_head_dim(self.geometry.head_dim)
        if is_model and fused_path.wants_bridge(fused, model_or_config):
            self._attach(model_or_config, "QuantizedKVCache(fused=True)", required=bool(fused))

    def full_attention_layer(self, layer_idx: int) -> QuantizedKVLayer:
        return QuantizedKVLayer(self.bits, self.group_size, self.residual_length, layer_idx, self.kernel_impl)


register("quantized", "quantization", "KIVI-layout int8/int4/int2 KV, full-precision recent window")(QuantizedKVCache)
