"""`QuantizedKVCache`: int8/int4 (and int2) KIVI-style KV cache for `model.generate`."""

from __future__ import annotations

from ..cache import CompressedCache
from ..registry import register
from ..storage import StorageSpec
from .layer import QuantizedKVLayer


class QuantizedKVCache(CompressedCache):
    """Quantized KV cache: full-attention layers store KIVI-layout codes, sliding layers keep their window.

    Example: `model.generate(**inputs, cache=QuantizedKVCache(model, bits=4))`.

    Args:
        model_or_config: the model (or its `PreTrainedConfig`) the cache will run with.
        bits: 8, 4 or 2. Bytes/element ~ bits/8 + 4/group_size (16-bit scale and zero).
        group_size: tokens per key group, channels per value group; must divide head_dim.
        residual_length: most recent tokens kept in full precision (>= 0).
    Paper: KIVI, https://arxiv.org/abs/2402.02750
    """

    def __init__(self, model_or_config, bits: int = 4, group_size: int = 64, residual_length: int = 128):
        if bits is None:
            raise ValueError("bits=None is not supported by QuantizedKVCache; accepted values: [2, 4, 8] "
                             "(use the `dynamic` strategy for full precision)")
        self.spec = StorageSpec(bits, group_size, residual_length, key_mode="channel")
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        super().__init__(model_or_config)
        self.spec.check_head_dim(self.geometry.head_dim)

    def full_attention_layer(self, layer_idx: int) -> QuantizedKVLayer:
        return QuantizedKVLayer(self.bits, self.group_size, self.residual_length)


register("quantized", "quantization", "KIVI-layout int8/int4/int2 KV, full-precision recent window")(QuantizedKVCache)
