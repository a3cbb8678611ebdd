"""Quantized KV caches (KIVI layout)."""

from .cache import QuantizedKVCache
from .layer import QuantizedKVLayer
from .static_cache import StaticQuantizedKVCache
from .static_layer import StaticQuantizedKVLayer

__all__ = ["QuantizedKVCache", "QuantizedKVLayer", "StaticQuantizedKVCache", "StaticQuantizedKVLayer"]
