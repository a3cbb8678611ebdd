"""kvpress_lite: compressed KV caches for Hugging Face transformers 5.x.

Pass a cache to `model.generate(..., cache=cache)` (transformers >= 5.24; `past_key_values=` before); see README.md
for strategies and results.
"""

from . import baselines  # noqa: F401  (registers the reference caches)
from ._compat import cache_kwarg
from .crosslayer import CrossLayerCache
from .eviction import EvictionCache, HeavyHitterCache
from .eviction.fixed_slot_cache import FixedSlotEvictionCache
from .memory import cache_nbytes
from .models import EMBEDDED_MODELS, load_model
from .quant import QuantizedKVCache, StaticQuantizedKVCache
from .registry import STRATEGIES, build_cache, get_strategy, register

__version__ = "0.1.0"

__all__ = [
    "EMBEDDED_MODELS",
    "CrossLayerCache",
    "EvictionCache",
    "FixedSlotEvictionCache",
    "HeavyHitterCache",
    "STRATEGIES",
    "QuantizedKVCache",
    "StaticQuantizedKVCache",
    "build_cache",
    "cache_kwarg",
    "cache_nbytes",
    "get_strategy",
    "load_model",
    "register",
]
