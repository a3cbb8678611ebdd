"""Quantized KV caches (KIVI layout)."""

from .cache import QuantizedKVCache
from .layer import QuantizedKVLayer

__all__ = ["QuantizedKVCache", "QuantizedKVLayer"]
