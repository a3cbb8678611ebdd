"""Heavy-hitter eviction family: H2O, TOVA, SnapKV, KNorm, StreamingLLM, Expected Attention and random, behind one
`EvictionCache`, with uniform or per-head (adaptive, AdaKV) budgets."""

from . import expected_attention, h2o, knorm, kvzip, random_policy, snapkv, streaming, tova  # noqa: F401  (registering)
from .adaptive import AdaptiveEvictionLayer
from .cache import EvictionCache, HeavyHitterCache
from .layer import EvictionLayer
from .policy import POLICIES, EvictionBudget, EvictionPolicy, ScoreInputs, make_policy
from .registration import register_policy

__all__ = [
    "AdaptiveEvictionLayer",
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
