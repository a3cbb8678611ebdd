"""Calibration: measure on the model itself what each candidate merge/share costs, and build a `CrossLayerPlan`.

`calibrate` measures what each candidate costs on the model itself: the increase of the calibration text's negative
log-likelihood when that candidate alone is applied, with the text's second part fed through the cache in chunks (so
attention reads the merged/shared KV). Candidates: every pair of consecutive compressible layers (merge), and for
every layer the previous layer plus the producer whose KV is closest (share; KVSharer, arXiv 2410.18517, searches
share pairs on calibration data too). It then adds candidates greedily, cheapest per byte saved first, each layer in
at most one entry, until the estimated KV bytes fall `target_ratio` times below DynamicCache's, and measures the
chosen plan as a whole.
"""

from __future__ import annotations

import math

import torch

from .._compat import DynamicCache, cache_kwarg
from ..cache import ModelGeometry
from .cache import CrossLayerCache
from .merge import retained_per_block
from .plan import CrossLayerPlan, compressible_layers


@torch.no_grad()
def calibration_nll(model, ids: torch.Tensor, cache, prefix: int, chunk: int = 16) -> float:
    """Mean NLL of `ids[:, prefix:]` fed through `cache` in chunks of `chunk` tokens after a `prefix` prefill."""
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
    r = retained_per_block(retain, block) / block
    return (2 * head_dim + 4 + 4 * head_dim * r + 4 * r) / (4 * head_dim)


@torch.no_grad()
def _captured_kv(model, ids: torch.Tensor) -> list:
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
