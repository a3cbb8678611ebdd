"""Cross-layer plans: which layers merge (MiniCache pairs) and which share (consumer -> producer), checked against a
model, serializable to JSON/YAML, and computed from a short calibration text by `calibrate`.

`calibrate` measures what each candidate costs on the model itself: the increase of the calibration text's negative
log-likelihood when that candidate alone is applied, with the text's second part fed through the cache in chunks (so
attention reads the merged/shared KV). Candidates: every pair of consecutive compressible layers (merge), and for
every layer the previous layer plus the producer whose KV is closest (share; KVSharer, arXiv 2410.18517, searches
share pairs on calibration data too). It then adds candidates greedily, cheapest per byte saved first, each layer in
at most one entry, until the estimated KV bytes fall `target_ratio` times below DynamicCache's, and measures the
chosen plan as a whole.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import torch

from ..cache import ModelGeometry

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
                f"this model (`kvpress_lite.crosslayer.calibrate`) or one of the shipped plans {sorted(_shipped())}"
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


def _shipped() -> dict:
    from .plans import SHIPPED_PLANS

    return SHIPPED_PLANS


def resolve_plan(plan) -> CrossLayerPlan:
    """A `CrossLayerPlan` from a plan, a dict, a shipped plan's name or a .json/.yaml path."""
    if isinstance(plan, CrossLayerPlan):
        return plan
    if isinstance(plan, dict):
        return CrossLayerPlan.from_dict(plan)
    if isinstance(plan, str):
        if plan in _shipped():
            return CrossLayerPlan.from_dict(_shipped()[plan])
        if os.path.isfile(plan):
            return CrossLayerPlan.load(plan)
    raise ValueError(
        f"plan={plan!r} is not a CrossLayerPlan, dict, file path or shipped plan; accepted names: {sorted(_shipped())}"
    )


# ---------------------------------------------------------------------------------------------------- calibration
@torch.no_grad()
def calibration_nll(model, ids: torch.Tensor, cache, prefix: int, chunk: int = 16) -> float:
    """Mean NLL of `ids[:, prefix:]` fed through `cache` in chunks of `chunk` tokens after a `prefix` prefill."""
    from .._compat import cache_kwarg

    key = cache_kwarg(model)
    out = model(ids[:, :prefix], use_cache=True, **{key: cache})
    last, total, count = out.logits[:, -1:], 0.0, 0
    for begin in range(prefix, ids.shape[1], chunk):
        part = ids[:, begin : begin + chunk]
        out = model(part, use_cache=True, **{key: cache})
        logits = torch.cat([last, out.logits[:, :-1]], dim=1).float()
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), part.flatten(), reduction="sum").item()
        count += part.numel()
        last = out.logits[:, -1:]
    return total / count


def pair_fraction(head_dim: int, retain: float, block: int) -> float:
    """Bytes of a merged pair over two full layers' (full precision): directions, 4 norms, retained + indices."""
    from .merge import retained_per_block

    r = retained_per_block(retain, block) / block
    return (2 * head_dim + 4 + 4 * head_dim * r + 4 * r) / (4 * head_dim)


@torch.no_grad()
def _captured_kv(model, ids: torch.Tensor) -> list:
    from .._compat import DynamicCache, cache_kwarg

    cache = DynamicCache(config=model.config)
    model(ids, use_cache=True, **{cache_kwarg(model): cache})
    return [(layer.keys.float(), layer.values.float()) if hasattr(layer, "keys") else None for layer in cache.layers]


def calibrate(
    model,
    calibration_ids: torch.Tensor,
    prefix: int = 256,
    chunk: int = 16,
    target_ratio: float = 1.6,
    max_ppl_increase: float | None = 0.05,
    verify: int = 24,
    t: float = 0.6,
    retain: float = 0.05,
    window: int = 32,
    block: int = 64,
    sinks: int = 4,
    log=None,
) -> CrossLayerPlan:
    """Measure every candidate merge/share on `calibration_ids` `[1, n]` and return a plan reaching `target_ratio`.

    Args:
        model: the model the plan is for.
        calibration_ids: `[1, n]` token ids (n > prefix); the first `prefix` are prefilled, the rest scored in chunks.
        target_ratio: stop adding entries once the estimated KV bytes of the compressible layers are this many times
            below DynamicCache's (a share removes one layer; a merge keeps `pair_fraction` of two).
        max_ppl_increase: None, or a quality budget: each entry is kept only if the plan so far, measured as a whole,
            stays within this perplexity increase on the calibration text (costs do not add up linearly).
        verify: how many of the cheapest candidates are tried against the budget (one measurement each).
        t / retain / window / block / sinks: merge settings the candidates are measured (and the plan run) with.
        log: optional callable receiving progress lines.
    Returns: a `CrossLayerPlan` whose `info` records each candidate's measured NLL increase and the whole plan's.
    """
    from .cache import CrossLayerCache

    if calibration_ids.dim() != 2 or calibration_ids.shape[0] != 1 or calibration_ids.shape[1] <= prefix:
        raise ValueError(f"calibration_ids must be [1, n] with n > prefix={prefix}, got {tuple(calibration_ids.shape)}")
    if target_ratio < 1:
        raise ValueError(f"target_ratio={target_ratio} must be >= 1")
    ids = calibration_ids.to(next(model.parameters()).device)
    geometry = ModelGeometry.of(model.config)
    layers = compressible_layers(geometry)
    settings = dict(t=t, retain=retain, window=window, block=block, sinks=sinks)

    def nll(pairs=(), share=None):
        return calibration_nll(
            model, ids, CrossLayerCache(model, pairs=list(pairs), share=share or {}, **settings), prefix, chunk
        )

    base = nll()
    kv = _captured_kv(model, ids)
    candidates = [("merge", (a, b)) for a, b in zip(layers, layers[1:])]
    for i, c in enumerate(layers[1:], start=1):  # share: the previous layer, and the closest earlier one
        kc, vc = kv[c]
        dist = {
            p: float(((kv[p][0] - kc).norm() / kc.norm()) ** 2 + ((kv[p][1] - vc).norm() / vc.norm()) ** 2)
            for p in layers[:i]
        }
        for p in {layers[i - 1], min(dist, key=dist.get)}:
            candidates.append(("share", (c, p)))
    costs = []
    for kind, (x, y) in candidates:
        delta = nll(pairs=[(x, y)]) - base if kind == "merge" else nll(share={x: y}) - base
        saved = 2 * (1 - pair_fraction(geometry.head_dim, retain, block)) if kind == "merge" else 1.0
        costs.append((delta / saved, kind, x, y, delta))
        if log:
            log(f"{kind} {x}{'+' if kind == 'merge' else '<-'}{y}: dNLL {delta:+.4f}")
    costs.sort()
    used, producers, pairs, share = set(), set(), [], {}
    units, total, joint = float(len(layers)), float(len(layers)), 0.0
    budget = None if max_ppl_increase is None else math.log1p(max_ppl_increase)
    for _, kind, x, y, _ in costs[:verify] if budget is not None else costs:
        if total / units >= target_ratio:
            break
        if kind == "merge" and not {x, y} & (used | producers):
            new_pairs, new_share, saved = (
                [*pairs, (x, y)],
                share,
                2 * (1 - pair_fraction(geometry.head_dim, retain, block)),
            )
        elif kind == "share" and x not in used | producers and y not in used:
            new_pairs, new_share, saved = pairs, {**share, x: y}, 1.0
        else:
            continue
        if budget is not None:
            delta = nll(new_pairs, new_share) - base
            if log:
                log(f"  plan + {kind} {x},{y}: dNLL {delta:+.4f} ({'kept' if delta <= budget else 'rejected'})")
            if delta > budget:
                continue
            joint = delta
        pairs, share, units = new_pairs, new_share, units - saved
        used |= {x, y} if kind == "merge" else {x}
        if kind == "share":
            producers.add(y)
    if budget is None:
        joint = nll(pairs, share) - base
    info = {
        "calibration_tokens": int(ids.shape[1]),
        "prefix": prefix,
        "chunk": chunk,
        "settings": settings,
        "target_ratio": target_ratio,
        "max_ppl_increase": max_ppl_increase,
        "estimated_ratio": round(total / units, 3),
        "base_nll": round(base, 5),
        "plan_dnll": round(joint, 5),
        "plan_ppl_change": round(math.exp(joint) - 1, 5),
        "candidates": [{"kind": k, "layers": [x, y], "dnll": round(d, 5)} for _, k, x, y, d in costs],
    }
    return CrossLayerPlan.for_model(geometry, sorted(pairs), dict(sorted(share.items())), info)
