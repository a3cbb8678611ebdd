"""Heavy-hitter eviction family: H2O, TOVA, SnapKV, KNorm, StreamingLLM and random, behind one `EvictionCache`."""

from . import h2o, knorm, random_policy, snapkv, streaming, tova  # noqa: F401  (each registers its policy)
from .cache import EvictionCache, HeavyHitterCache
from .layer import EvictionLayer
from .policy import POLICIES, EvictionBudget, EvictionPolicy, ScoreInputs, make_policy
from .registration import register_policy

__all__ = [
    "POLICIES",
    "EvictionBudget",
    "EvictionCache",
    "EvictionLayer",
    "EvictionPolicy",
    "HeavyHitterCache",
    "ScoreInputs",
    "make_policy",
    "register_policy",
]
