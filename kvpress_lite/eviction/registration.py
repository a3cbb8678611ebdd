"""`@register_policy`: one decorator makes a policy an `EvictionCache` policy and a registry strategy."""

from __future__ import annotations

import dataclasses
import inspect

from ..registry import register
from .cache import EvictionCache
from .policy import POLICIES


def register_policy(name: str, summary: str):
    """Class decorator: add a policy to `POLICIES` and register strategy `name` (family "eviction") building
    `EvictionCache(model, policy=name, **params)`; its params are `EvictionCache`'s keyword arguments (budget, storage,
    fused path) and the policy's fields."""

    def decorator(cls):
        def factory(model, **params):
            return EvictionCache(model, policy=name, **params)

        keyword = inspect.Parameter.KEYWORD_ONLY
        cache_args = [p for p in inspect.signature(EvictionCache.__init__).parameters.values()
                      if p.name not in ("self", "model", "policy") and p.kind is not inspect.Parameter.VAR_KEYWORD]
        policy_fields = [(f.name, f.default) for f in dataclasses.fields(cls) if f.init]
        fields = [(p.name, p.default) for p in cache_args] + policy_fields
        factory.__signature__ = inspect.Signature(
            [inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
            + [inspect.Parameter(field, keyword, default=default) for field, default in fields]
        )
        factory.__name__ = factory.__qualname__ = f"{name}_cache"
        factory.__doc__ = f"`EvictionCache(model, policy={name!r}, **params)`: {summary}."
        register(name, "eviction", summary)(factory)  # first: a taken name raises before POLICIES changes
        cls.name = name
        POLICIES[name] = cls
        return cls

    return decorator
