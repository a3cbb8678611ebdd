"""`QuantizedKVCache`: int8/int4 (and int2) KIVI-style KV cache for `model.generate`."""

from __future__ import annotations

from .._compat import Cache, decoder_config, kv_geometry, layer_specs, passthrough_layer, validate_attention_model
from .layer import QuantizedKVLayer
from ..registry import register
from .ops import SUPPORTED_BITS


class QuantizedKVCache(Cache):
    """Quantized KV cache: full-attention layers store KIVI-layout codes, sliding layers keep their window.

    Example: `model.generate(**inputs, past_key_values=QuantizedKVCache(model.config, bits=4))`.

    Args:
        config: the model's `PreTrainedConfig` (or the model itself).
        bits: 8, 4 or 2. Bytes/element ~ bits/8 + 4/group_size (16-bit scale and zero).
        group_size: tokens per key group, channels per value group; must divide head_dim.
        residual_length: most recent tokens kept in full precision (>= 0).
    Paper: KIVI, https://arxiv.org/abs/2402.02750
    """

    def __init__(self, config, bits: int = 4, group_size: int = 64, residual_length: int = 128):
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={bits!r} is not supported; accepted values: {list(SUPPORTED_BITS)}")
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
            raise ValueError(f"group_size={group_size!r} must be a positive integer dividing head_dim")
        if not isinstance(residual_length, int) or isinstance(residual_length, bool) or residual_length < 0:
            raise ValueError(f"residual_length={residual_length!r} must be an integer >= 0")
        config = decoder_config(config)
        validate_attention_model(config, "QuantizedKVCache")
        _, head_dim = kv_geometry(config)
        if head_dim % group_size:
            divisors = [d for d in range(1, head_dim + 1) if head_dim % d == 0]
            raise ValueError(
                f"group_size={group_size} must divide head_dim={head_dim} (values are grouped along head_dim); "
                f"accepted values: {divisors}"
            )
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        layers = [
            QuantizedKVLayer(bits, group_size, residual_length) if kind == "full_attention" else passthrough_layer(kind, kw)
            for kind, kw in zip(*layer_specs(config))
        ]
        super().__init__(layers=layers)


register("quantized", "quantization", "KIVI-layout int8/int4/int2 KV, full-precision recent window")(QuantizedKVCache)
