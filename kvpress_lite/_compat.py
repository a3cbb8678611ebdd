"""Every touch of transformers internals lives here (supported: transformers >=5.17,<6).

Known breaks across the supported range (see docs/design/cache-contract.md): 5.18 `DynamicLayer.reset` drops
tensors, 5.19 per-layer kwargs from `get_layer_types_and_kwargs`, 5.20 positive `crop(n)` raises,
5.23 `DummyLayer`. Code elsewhere imports layer classes and helpers from this module only.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    StaticLayer,
    StaticSlidingWindowLayer,
)

try:  # transformers >= 5.23
    from transformers.cache_utils import DummyLayer
except ImportError:  # pragma: no cover - older transformers
    DummyLayer = None

__all__ = [
    "Cache",
    "CacheLayerMixin",
    "DynamicCache",
    "DynamicLayer",
    "DynamicSlidingWindowLayer",
    "DummyLayer",
    "decoder_config",
    "layer_specs",
    "validate_attention_model",
]

# Layer types whose KV this library can hold: full attention is compressed, sliding/chunked layers keep
# transformers' own window, dummy layers (KV-sharing consumers, moe/mlp) store nothing.
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention", "dummy")
_NO_ATTENTION_TYPES = ("moe", "mlp")


def decoder_config(config_or_model):
    """Return the text-decoder config of a model or config (multimodal configs wrap one)."""
    config = getattr(config_or_model, "config", config_or_model)
    if not hasattr(config, "get_text_config"):
        raise ValueError(
            f"`config` must be a transformers PreTrainedConfig or PreTrainedModel, got {type(config_or_model).__name__}"
        )
    return config.get_text_config(decoder=True)


def validate_attention_model(config, strategy: str) -> None:
    """Raise a ValueError for models whose cache is not plain per-layer K/V (MLA latents, linear attention)."""
    if getattr(config, "kv_lora_rank", None) is not None:
        raise ValueError(
            f"{strategy}: model_type={config.model_type!r} uses multi-head latent attention (MLA, `kv_lora_rank` in "
            "its config); its cache holds a latent, not keys/values. Supported: models with standard multi-head or "
            "grouped-query attention (e.g. Llama, Mistral, Qwen2/3, Gemma 2/3)."
        )
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{strategy}: model_type={config.model_type!r} is an encoder-decoder model. Supported: decoder-only models."
        )
    layer_types, _ = layer_specs(config)
    bad = sorted(set(layer_types) - set(SUPPORTED_LAYER_TYPES))
    if bad:
        raise ValueError(
            f"{strategy}: model_type={config.model_type!r} has layer types {bad} (linear attention / state-space "
            f"layers). Supported `layer_types`: {list(SUPPORTED_LAYER_TYPES)}."
        )


def layer_specs(config) -> tuple[list[str], list[dict]]:
    """Per-layer `(layer_type, kwargs)` as transformers would build a DynamicCache, on any 5.x version.

    `kwargs` holds `sliding_window` for sliding/chunked layers.
    """
    config = decoder_config(config)
    n_layers = config.num_hidden_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
            layer_types = ["sliding_attention"] * n_layers
        elif getattr(config, "attention_chunk_size", None) is not None:
            layer_types = ["chunked_attention"] * n_layers
        else:
            layer_types = ["full_attention"] * n_layers
    kv_sharing = getattr(config, "kv_sharing_modes", None)
    if kv_sharing is not None:
        layer_types = ["dummy" if mode == "reuse" else t for t, mode in zip(layer_types, kv_sharing)]
    layer_types = ["dummy" if t in _NO_ATTENTION_TYPES else t for t in layer_types]
    kwargs = []
    for t in layer_types:
        if t == "sliding_attention":
            kwargs.append({"sliding_window": config.sliding_window})
        elif t == "chunked_attention":
            kwargs.append({"sliding_window": config.attention_chunk_size})
        else:
            kwargs.append({})
    return list(layer_types), kwargs


def passthrough_layer(layer_type: str, kwargs: dict):
    """The layer transformers' DynamicCache would use for an uncompressed layer type."""
    if layer_type == "dummy":
        if DummyLayer is None:  # pragma: no cover - transformers < 5.23 has no dummy layers
            return DynamicLayer()
        return DummyLayer()
    if layer_type in ("sliding_attention", "chunked_attention"):
        return DynamicSlidingWindowLayer(**kwargs)
    return DynamicLayer()


def static_passthrough_layer(layer_type: str, kwargs: dict, max_cache_len: int):
    """The layer transformers' StaticCache would use for an uncompressed layer type (preallocated, compileable)."""
    if layer_type == "dummy":
        if DummyLayer is None:  # pragma: no cover - transformers < 5.23 has no dummy layers
            return StaticLayer(max_cache_len=max_cache_len)
        return DummyLayer()
    if layer_type in ("sliding_attention", "chunked_attention"):
        return StaticSlidingWindowLayer(max_cache_len=max_cache_len, **kwargs)
    return StaticLayer(max_cache_len=max_cache_len)


def is_compiling() -> bool:
    """True while torch.compile (dynamo) traces the current code."""
    return torch.compiler.is_compiling()


def mark_static_address(tensor: torch.Tensor) -> None:
    """Tell dynamo that `tensor` keeps its address across calls (as transformers' StaticLayer does), so compiled graphs
    mutate it in place and CUDA graphs capture it, instead of re-recording or copying it every step."""
    if not is_compiling():
        torch._dynamo.mark_static_address(tensor)


def reset_layer(layer) -> None:
    """Empty one cache layer for a new prompt, on every supported version.

    transformers 5.17's `DynamicLayer.reset` zeroes its tensors but keeps them (a reused cache would attend to zero
    keys, and a sliding layer would report the old length); 5.18+ drops them. Do what 5.18+ does everywhere.
    """
    if isinstance(layer, DynamicLayer):
        layer.keys = layer.values = None
        layer.is_initialized = False
    layer.reset()


def kv_geometry(config) -> tuple[int, int]:
    """(num_key_value_heads, head_dim) of a decoder config."""
    config = decoder_config(config)
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return n_kv, head_dim


def cache_kwarg(model) -> str:
    """Name of the forward/generate keyword that takes a Cache: `cache` (5.24+) or `past_key_values`."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# --- Attention bridge (kvpress_lite.attention_bridge): attention functions never receive the cache, so caches reach
# the attention of the layer they just updated through a wrapper registered with transformers' AttentionInterface. ---

BRIDGEABLE_ATTENTION = ("sdpa", "eager")
_BRIDGED_PREFIX = "kvpress_lite_bridged_"


def attention_implementation(model) -> str | None:
    """The attention implementation a model's (text) config dispatches to, e.g. `"sdpa"`."""
    return decoder_config(model)._attn_implementation


def set_attention_implementation(model, name: str) -> None:
    """Switch a PreTrainedModel (and its sub-models) to the registered attention implementation `name`."""
    model.set_attn_implementation(name)


def bridged_base(name: str | None) -> str | None:
    """The wrapped implementation of a bridged attention name (`"sdpa"`/`"eager"`), or None for other names."""
    if name and name.startswith(_BRIDGED_PREFIX):
        return name[len(_BRIDGED_PREFIX) :]
    return None


def _eager_attention_for(module):
    """The eager attention function of `module`'s modeling file (model-specific: softcap, sinks...)."""
    import sys

    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:  # pragma: no cover - every transformers decoder defines one; Llama's is the generic version
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn


def bridged_attention(base: str, handler) -> str:
    """Register (idempotently) the attention function `handler(base_fn, module, query, key, value, attention_mask,
    **kwargs)` as a variant of `base`; return its name for `set_attention_implementation`.

    `base_fn` is `base`'s own function for the module (transformers' sdpa, or the modeling file's eager function),
    with transformers' signature `(module, query [B, H_q, q, D], key, value [B, H_kv, P, D], attention_mask, **kwargs)
    -> (output [B, q, H_q, D], weights or None)`. The mask function of `base` is registered under the same name, so
    the model builds the masks it builds for `base`.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base not in BRIDGEABLE_ATTENTION:
        raise ValueError(
            f"attn_implementation={base!r} cannot be bridged; accepted values: {list(BRIDGEABLE_ATTENTION)}"
        )
    name = _BRIDGED_PREFIX + base

    def attention(module, query, key, value, attention_mask, **kwargs):
        fn = ALL_ATTENTION_FUNCTIONS["sdpa"] if base == "sdpa" else _eager_attention_for(module)
        return handler(fn, module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def rope_inv_freq(model, layer_type: str = "full_attention") -> torch.Tensor | None:
    """RoPE inverse frequencies `[head_dim // 2]` fp32 of `model`'s `layer_type` layers, or None if it has no rotary
    embedding module (Llama-like: `rotary_emb.inv_freq`; Gemma 3: `rotary_emb.<layer_type>_inv_freq`)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    rotary = getattr(decoder, "rotary_emb", None) or getattr(getattr(decoder, "language_model", None), "rotary_emb",
                                                               None)
    if rotary is None:
        return None
    inv_freq = getattr(rotary, f"{layer_type}_inv_freq", None)
    if inv_freq is None:
        inv_freq = getattr(rotary, "inv_freq", None)
    return None if inv_freq is None else inv_freq.detach().float()


def attention_base_of(module) -> str:
    """The attention implementation (`"sdpa"` or `"eager"`) a module runs under the attention bridge."""
    name = module.config._attn_implementation
    return bridged_base(name) or name


def attention_scale(model) -> float | None:
    """The softmax scale of `model`'s attention modules (`module.scaling`, e.g. Gemma 3's query_pre_attn_scalar**-0.5),
    or None if they do not expose one (then 1/sqrt(head_dim) is the convention)."""
    for module in model.modules():
        if hasattr(module, "scaling") and hasattr(module, "layer_idx"):
            return float(module.scaling)
    return None


def scratch_copy(layer):
    """A copy of a transformers cache layer that can be updated without touching `layer` (a shallow copy: dynamic and
    sliding-window layers rebind their tensors on update, `torch.cat`, never write in place)."""
    import copy

    return copy.copy(layer)
