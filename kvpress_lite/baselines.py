"""Reference caches from transformers, registered so the harness can compare against them."""

from __future__ import annotations

from ._compat import DynamicCache, decoder_config
from .registry import register


@register("dynamic", "baseline", "transformers DynamicCache: uncompressed reference")
def dynamic_cache(model):
    """transformers' DynamicCache for `model` (sliding layers keep their window)."""
    return DynamicCache(config=decoder_config(model))


@register("hf-quantized", "baseline", "transformers QuantizedCache (quanto/hqq backend): the peer to beat")
def hf_quantized_cache(model, backend: str = "quanto", bits: int = 4, group_size: int = 64, residual_length: int = 128):
    """transformers' QuantizedCache; quanto supports bits 2/4, hqq 1-8 (needs `hqq`)."""
    from transformers.cache_utils import QuantizedCache

    if backend not in ("quanto", "hqq"):
        raise ValueError(f"backend={backend!r} is not supported; accepted values: ['quanto', 'hqq']")
    return QuantizedCache(
        backend, decoder_config(model), nbits=bits, q_group_size=group_size, residual_length=residual_length
    )
