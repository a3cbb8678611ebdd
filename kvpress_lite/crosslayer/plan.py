"""Cross-layer plans: which layers merge (MiniCache pairs) and which share (consumer -> producer), checked against a
model, serializable to JSON/YAML. `calibration.calibrate` computes one on a short text; `shipped_plans` holds the ones
made for the embedded models.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from ..cache import ModelGeometry
from .shipped_plans import SHIPPED_PLANS

COMPRESSIBLE = "full_attention"  # layers of this type can merge/share; hybrid models' sliding layers keep their window


def compressible_layers(geometry: ModelGeometry) -> list[int]:
    """Indices of the layers a cross-layer cache may merge or share (full-attention layers: one RoPE base)."""
    return [i for i, kind in enumerate(geometry.layer_types) if kind == COMPRESSIBLE]


def _layer(name: str, value, geometry: ModelGeometry) -> int:
    eligible = compressible_layers(geometry)
    accepted = f"accepted: the {COMPRESSIBLE} layers {_span(eligible)}"
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < geometry.num_layers:
        raise ValueError(f"{name}: layer {value!r} is out of range for a {geometry.num_layers}-layer model; {accepted}")
    if value not in eligible:
        raise ValueError(
            f"{name}: layer {value} is a {geometry.layer_types[value]} layer; its keys are rotated with another RoPE "
            f"base (and windowed) than the {COMPRESSIBLE} layers, so it cannot merge or share with them; {accepted}"
        )
    return value


def _span(layers: list[int]) -> str:
    if layers and layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 3:
        return f"{layers[0]}..{layers[-1]}"
    return str(layers)


def check_layout(pairs, share, geometry: ModelGeometry) -> tuple[list[tuple[int, int]], dict[int, int]]:
    """Validate merge `pairs` [(a, b), ...] and a `share` map {consumer: producer}; return them normalized.

    Raises a ValueError naming the parameter and the accepted values for: layers out of range or not compressible
    (e.g. a sliding layer of Gemma 3), a pair that is not two distinct layers a < b, a layer used twice, a consumer
    mapped to itself or to a later layer (which also rules out cycles), a consumer that is also merged.
    """
    used: dict[int, str] = {}
    norm_pairs = []
    for pair in pairs or []:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"pairs: each entry must be two layer indices [a, b] with a < b, got {pair!r}")
        a, b = (_layer("pairs", x, geometry) for x in pair)
        if a >= b:
            raise ValueError(f"pairs: [{a}, {b}] must list two different layers in increasing order (a < b)")
        for x in (a, b):
            if x in used:
                raise ValueError(
                    f"pairs: layer {x} appears twice ({used[x]} and pair [{a}, {b}]); each layer may be in "
                    "one pair or share entry"
                )
            used[x] = f"pair [{a}, {b}]"
        norm_pairs.append((a, b))
    norm_share: dict[int, int] = {}
    if share is not None and not isinstance(share, dict):
        raise ValueError(f"share must be a mapping {{consumer layer: producer layer}}, got {type(share).__name__}")
    for consumer, producer in (share or {}).items():
        c = _layer("share (consumer)", consumer, geometry)
        p = _layer("share (producer)", producer, geometry)
        if p >= c:
            accepted = [x for x in compressible_layers(geometry) if x < c]
            raise ValueError(
                f"share: consumer {c} -> producer {p}: a consumer must read an earlier layer (not itself, not a later "
                f"layer, so no cycles); accepted producers for {c}: {_span(accepted)}"
            )
        if c in used:
            raise ValueError(
                f"share: consumer {c} is already in {used[c]}; a consumer stores nothing, so it cannot be "
                "merged or consume twice"
            )
        used[c] = f"share {c} -> {p}"
        norm_share[c] = p
    for c in norm_share:  # a consumer of a consumer reads the first producer of the chain
        p = norm_share[c]
        while p in norm_share:
            p = norm_share[p]
        norm_share[c] = p
    return norm_pairs, dict(sorted(norm_share.items()))


def default_pairs(geometry: ModelGeometry, start: int) -> list[tuple[int, int]]:
    """Consecutive compressible layers from `start` on, two by two: (start, start+1), (start+2, start+3), ..."""
    layers = [i for i in compressible_layers(geometry) if i >= start]
    return [(layers[i], layers[i + 1]) for i in range(0, len(layers) - 1, 2)]


@dataclass
class CrossLayerPlan:
    """Which layers merge and which share, for one model geometry.

    Args:
        model_type / num_layers / kv_heads / head_dim / layer_types: the model the plan was made for.
        merges: MiniCache pairs `[[a, b], ...]`.
        shares: `{consumer: producer}` (producer < consumer).
        info: how it was made (calibration text, measured costs); not used by the cache.
    """

    model_type: str
    num_layers: int
    kv_heads: int
    head_dim: int
    layer_types: list[str]
    merges: list[list[int]] = field(default_factory=list)
    shares: dict[int, int] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @classmethod
    def for_model(cls, geometry: ModelGeometry, merges=(), shares=None, info=None) -> CrossLayerPlan:
        return cls(
            geometry.model_type,
            geometry.num_layers,
            geometry.kv_heads,
            geometry.head_dim,
            list(geometry.layer_types),
            [list(p) for p in merges],
            dict(shares or {}),
            dict(info or {}),
        )

    def check(self, geometry: ModelGeometry) -> tuple[list[tuple[int, int]], dict[int, int]]:
        """Validate against the model that will run it; return (pairs, share map)."""
        made_for = (self.model_type, self.num_layers, self.kv_heads, self.head_dim, tuple(self.layer_types))
        running = (geometry.model_type, geometry.num_layers, geometry.kv_heads, geometry.head_dim, geometry.layer_types)
        if made_for != running:
            raise ValueError(
                f"plan was made for model_type={self.model_type!r}, {self.num_layers} layers, {self.kv_heads} KV "
                f"heads, head_dim={self.head_dim}, but this cache is for {geometry.describe()}; accepted: a plan "
                "calibrated on "
                f"this model (`kvpress_lite.crosslayer.calibrate`) or one of the shipped plans {sorted(SHIPPED_PLANS)}"
            )
        return check_layout(self.merges, self.shares, geometry)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["shares"] = {str(c): p for c, p in self.shares.items()}  # JSON object keys are strings
        return out

    @classmethod
    def from_dict(cls, data: dict) -> CrossLayerPlan:
        known = {"model_type", "num_layers", "kv_heads", "head_dim", "layer_types", "merges", "shares", "info"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"plan: unknown keys {unknown}; accepted: {sorted(known)}")
        data = dict(data)
        data["shares"] = {int(c): int(p) for c, p in (data.get("shares") or {}).items()}
        data["merges"] = [list(map(int, p)) for p in data.get("merges") or []]
        return cls(**data)

    def save(self, path: str) -> None:
        """Write the plan as JSON (or YAML for a .yaml/.yml path)."""
        with open(path, "w", encoding="utf-8") as handle:
            if path.endswith((".yaml", ".yml")):
                import yaml

                yaml.safe_dump(self.to_dict(), handle, sort_keys=False)
            else:
                json.dump(self.to_dict(), handle, indent=1)

    @classmethod
    def load(cls, path: str) -> CrossLayerPlan:
        with open(path, encoding="utf-8") as handle:
            if path.endswith((".yaml", ".yml")):
                import yaml

                return cls.from_dict(yaml.safe_load(handle))
            return cls.from_dict(json.load(handle))


def resolve_plan(plan) -> CrossLayerPlan:
    """A `CrossLayerPlan` from a plan, a dict, a shipped plan's name or a .json/.yaml path."""
    if isinstance(plan, CrossLayerPlan):
        return plan
    if isinstance(plan, dict):
        return CrossLayerPlan.from_dict(plan)
    if isinstance(plan, str):
        if plan in SHIPPED_PLANS:
            return CrossLayerPlan.from_dict(SHIPPED_PLANS[plan])
        if os.path.isfile(plan):
            return CrossLayerPlan.load(plan)
    raise ValueError(
        f"plan={plan!r} is not a CrossLayerPlan, dict, file path or shipped plan; "
        f"accepted names: {sorted(SHIPPED_PLANS)}"
    )
