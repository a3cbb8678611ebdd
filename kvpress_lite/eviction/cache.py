"""`EvictionCache`: a KV cache that keeps a fixed budget of tokens per layer, ranked by a policy."""

from __future__ import annotations

import weakref

from .._compat import Cache, decoder_config, layer_specs, passthrough_layer, validate_attention_model
from . import observe
from .layer import EvictionLayer
from .policy import EvictionBudget, make_policy


class EvictionCache(Cache):
    """Evicting KV cache: full-attention layers keep `budget` tokens chosen by `policy`; sliding layers keep
    transformers' window. Memory is really freed (kept slots are gathered into new tensors).

    Example: `model.generate(**inputs, past_key_values=EvictionCache(model, policy="h2o", ratio=0.5))`.

    The cache switches `model` to an observing wrapper of its attention implementation (sdpa or eager), which computes
    what the policy needs from the queries; `detach()`, leaving `with cache:` or garbage collection restores it. The
    wrapper returns exactly what the original returns, so the model behaves the same with any other cache meanwhile.

    Args:
        model: the `PreTrainedModel` that will run with this cache (decoder-only, sdpa or eager attention, no MLA).
        policy: a name in `kvpress_lite.eviction.POLICIES`: "h2o", "tova", "snapkv", "knorm", "streaming", "random".
        budget / ratio / sinks / recent / slack: see `EvictionBudget` (exactly one of budget and ratio).
        **policy_params: the policy's hyperparameters (e.g. `window=`, `kernel=` for snapkv, `seed=` for random).
    Storage per full-attention layer: keys/values `[batch, kv_heads, P, head_dim]` with P <= budget + slack.
    """

    def __init__(self, model, policy: str = "h2o", budget: int | None = None, ratio: float | None = None,
                 sinks: int = 4, recent: int = 16, slack: int | None = None, **policy_params):
        if not hasattr(model, "set_attn_implementation"):
            raise ValueError(
                f"model must be a transformers PreTrainedModel (EvictionCache observes its attention), got "
                f"{type(model).__name__}"
            )
        config = decoder_config(model)
        validate_attention_model(config, "EvictionCache")
        self.policy = make_policy(policy, **policy_params)
        self.spec = EvictionBudget(budget, ratio, sinks, recent, slack)
        layers = [
            EvictionLayer(self.policy, self.spec, i) if kind == "full_attention" else passthrough_layer(kind, kw)
            for i, (kind, kw) in enumerate(zip(*layer_specs(config)))
        ]
        super().__init__(layers=layers)
        observe.attach(model)
        self._detach = weakref.finalize(self, observe.detach, weakref.ref(model))

    def detach(self) -> None:
        """Give the model back its original attention implementation (idempotent); the cache cannot run after."""
        self._detach()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def metadata_nbytes(self) -> int:
        """Bytes kept besides keys and values: slot positions, policy scores, pad counts."""
        return sum(layer.metadata_nbytes() for layer in self.layers if isinstance(layer, EvictionLayer))


class HeavyHitterCache(EvictionCache):
    """H2O heavy-hitter cache: `EvictionCache(model, policy="h2o", ...)` (arXiv 2306.14048).

    Keeps the tokens with the largest attention mass accumulated over all queries so far, plus `sinks` first and
    `recent` last tokens. Args as `EvictionCache`, without `policy`; `average=True` ranks by mean attention per query
    that saw the token instead of the sum (no bias toward old tokens, see `H2OPolicy`).
    """

    def __init__(self, model, budget: int | None = None, ratio: float | None = None, sinks: int = 4, recent: int = 16,
                 slack: int | None = None, average: bool = False):
        super().__init__(model, "h2o", budget=budget, ratio=ratio, sinks=sinks, recent=recent, slack=slack,
                         average=average)
