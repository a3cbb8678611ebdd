"""One registry of cache strategies (name -> factory), read by the CLI, the eval harness, recipes and tests."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("baseline", "quantization", "eviction", "cross-layer")


@dataclass(frozen=True)
class Strategy:
    """A registered strategy: `factory(model, **params)` returns a fresh `transformers.Cache`."""

    name: str
    family: str
    factory: Callable[..., Any]
    summary: str
    params: dict[str, Any] = field(default_factory=dict)  # accepted keyword params and their defaults

    def build(self, model, **params):
        """Build a cache for `model`; unknown params raise a ValueError naming the accepted ones."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise ValueError(
                f"strategy {self.name!r} got unknown parameter(s) {unknown}; accepted: {sorted(self.params)}"
            )
        return self.factory(model, **params)


class Registry(dict):
    """A name -> entry map that decorators fill: a name registers once; looking up an unknown name lists the known ones.

    The open registries (strategies here, tasks in `eval/tasks`) are `Registry`s that users extend from their own code;
    closed tables of data (`EMBEDDED_MODELS`, the shipped cross-layer plans) stay plain dicts.
    """

    def __init__(self, kind: str, plural: str):
        super().__init__()
        self.kind, self.plural = kind, plural

    def add(self, name: str, entry):
        """Register `entry` as `name`; a name already taken raises a ValueError."""
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is already registered; registered {self.plural}: {sorted(self)}")
        self[name] = entry
        return entry

    def lookup(self, name: str):
        """The entry registered as `name`; an unknown name raises a ValueError listing the registered ones."""
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; registered {self.plural}: {sorted(self)}")
        return self[name]


STRATEGIES: Registry = Registry("strategy", "strategies")


def _keyword_params(factory) -> dict[str, Any]:
    sig = inspect.signature(factory)
    names = list(sig.parameters.values())[1:]  # first parameter is the model/config
    return {p.name: (None if p.default is inspect.Parameter.empty else p.default) for p in names}


def register(name: str, family: str, summary: str):
    """Decorator registering a cache factory (a Cache class or function taking `(model, **params)`)."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not one of {list(FAMILIES)}")

    def decorator(factory):
        STRATEGIES.add(name, Strategy(name, family, factory, summary, _keyword_params(factory)))
        return factory

    return decorator


def get_strategy(name: str) -> Strategy:
    """Look up a strategy by name; unknown names raise a ValueError listing the registered ones."""
    return STRATEGIES.lookup(name)


def build_cache(name: str, model, **params):
    """Build the cache registered as `name` for `model` (a PreTrainedModel)."""
    return get_strategy(name).build(model, **params)
