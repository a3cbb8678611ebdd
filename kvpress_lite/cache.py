"""`CompressedCache`: the base of every kvpress_lite cache.

A family writes one hook, `full_attention_layer(layer_idx)` (what it stores at a full-attention layer); the base builds
one layer per model layer from the config's `layer_types` (sliding/chunked layers keep transformers' window, dummy
layers store nothing), and checks on every `update` that the model running the cache is the one it was built for.

Constructor convention, every family: the first argument is the model (`PreTrainedModel`) or, for caches that need
no model (quantized, cross-layer `share`/`merge` without calibration), its config. Reusing a cache for a new prompt
needs `cache.reset()` first; without it `generate` would continue from the old tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._compat import (
    Cache,
    decoder_config,
    is_compiling,
    kv_geometry,
    layer_specs,
    passthrough_layer,
    reset_layer,
    validate_attention_model,
)


@dataclass(frozen=True)
class ModelGeometry:
    """What a cache knows of the model it was built for."""

    model_type: str
    num_layers: int
    kv_heads: int
    head_dim: int
    layer_types: tuple[str, ...]

    @classmethod
    def of(cls, config) -> ModelGeometry:
        config = decoder_config(config)
        kv_heads, head_dim = kv_geometry(config)
        layer_types, _ = layer_specs(config)
        return cls(config.model_type, len(layer_types), kv_heads, head_dim, tuple(layer_types))

    def describe(self) -> str:
        return (f"model_type={self.model_type!r}, {self.num_layers} layers, {self.kv_heads} KV heads, "
                f"head_dim={self.head_dim}")


class CompressedCache(Cache):
    """A `transformers.Cache` whose full-attention layers come from `full_attention_layer`; see module docstring.

    Args:
        model_or_config: the model (or its config) this cache will run with.
    """

    def __init__(self, model_or_config):
        config = decoder_config(model_or_config)
        validate_attention_model(config, type(self).__name__)
        self.geometry = ModelGeometry.of(config)
        self._layer_specs = layer_specs(config)
        super().__init__(layers=self.build_layers())
        self._last_layer = -1  # highest layer index updated in the current forward
        self._attention_layers = [i for i, t in enumerate(self._layer_specs[0]) if t != "dummy"]

    def build_layers(self) -> list:
        """One cache layer per model layer: `full_attention_layer` or `uncompressed_layer` by its type."""
        layer_types, kwargs = self._layer_specs
        return [
            self.full_attention_layer(i) if kind == "full_attention" else self.uncompressed_layer(kind, kw, i)
            for i, (kind, kw) in enumerate(zip(layer_types, kwargs))
        ]

    def full_attention_layer(self, layer_idx: int):
        """The cache layer a family stores at full-attention layer `layer_idx`."""
        raise NotImplementedError

    def uncompressed_layer(self, layer_type: str, kwargs: dict, layer_idx: int):
        """The layer kept at sliding/chunked/dummy layer `layer_idx`: transformers' dynamic one unless a family
        overrides it (`kwargs` holds `sliding_window` for sliding/chunked layers)."""
        return passthrough_layer(layer_type, kwargs)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Check the running model against the one this cache was built for, then update layer `layer_idx`.

        Under torch.compile the check is skipped (shapes are fixed in the graph; the eager prompt forward checked)."""
        if not is_compiling():
            self._check_model(key_states, layer_idx)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _check_model(self, key_states: torch.Tensor, layer_idx: int) -> None:
        g = self.geometry
        running = None
        if key_states.dim() != 4 or key_states.shape[1] != g.kv_heads or key_states.shape[-1] != g.head_dim:
            running = f"keys of shape {tuple(key_states.shape)} (expected [batch, {g.kv_heads}, seq, {g.head_dim}])"
        elif layer_idx >= g.num_layers:
            running = f"at least {layer_idx + 1} layers"
        elif layer_idx <= self._last_layer and self._last_layer != self._attention_layers[-1]:
            running = f"{self._last_layer + 1} layers"  # a new forward began before reaching our last layer
        if running is not None:
            raise ValueError(
                f"{type(self).__name__} was built for {g.describe()}, but the model running it has {running}. "
                "Build the cache from the model that runs it (one cache per model)."
            )
        self._last_layer = layer_idx

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        """transformers' mask sizes; an empty input (no new token) raises a ValueError saying why."""
        if query_length == 0:
            raise ValueError(
                f"{type(self).__name__}: the model got 0 new tokens. Either the prompt is empty, or this cache already "
                f"holds {self.get_seq_length()} tokens and the new prompt is not longer: call `cache.reset()` before "
                "reusing a cache for a new prompt."
            )
        return super().get_mask_sizes(query_length, layer_idx)

    def reset(self) -> None:
        """Drop every cached token (all layers); the cache can then serve a new prompt."""
        for layer in self.layers:
            reset_layer(layer)
        self._last_layer = -1
