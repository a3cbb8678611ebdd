"""Run one shard of a run (some sample or window indices) and turn all shards' records into metrics."""

from __future__ import annotations

import hashlib
import math
import random
import statistics

import torch

from kvpress_lite.memory import cache_nbytes
from kvpress_lite.registry import build_cache

from .generation import greedy_generate
from .perplexity import perplexity_through_cache
from .runs import Run
from .tasks import Prompter, get_task


def make_sample(run: Run, tokenizer, index: int):
    """Sample `index` of a task run: depth cycles through `depths`, randomness from (seed, task, length, index)."""
    spec = run.part
    entry = get_task(spec.task)
    depth = spec.depths[index % len(spec.depths)]
    rng = random.Random(f"{run.recipe.seed}/{spec.task}/{run.length}/{index}")
    haystack = spec.haystack or entry.task.default_haystack
    return entry.task.sample(spec.params, Prompter(tokenizer, run.recipe.chat), run.length, depth, haystack, rng, index)


def task_shard(run: Run, model, tokenizer, indices: list[int], progress=None) -> list[dict]:
    """Generate and extract answers for `indices`, `batch_size` at a time (left padding), one fresh cache per batch;
    `progress(n)` (optional) after each batch of n samples."""
    spec, entry = run.part, get_task(run.part.task)
    prompter = Prompter(tokenizer, run.recipe.chat)
    max_new = spec.max_new_tokens or entry.task.max_new_tokens(spec.params)
    records = []
    for start in range(0, len(indices), spec.batch_size):
        samples = [make_sample(run, tokenizer, i) for i in indices[start : start + spec.batch_size]]
        cache = build_cache(run.cache.strategy, model, **run.cache.params)
        out = greedy_generate(model, tokenizer, [prompter.encode(s.prompt) for s in samples], cache, max_new)
        kv_bytes, cache_tokens = cache_nbytes(cache), int(cache.get_seq_length())  # a tensor for compileable caches
        for sample, text in zip(samples, out["texts"]):
            extracted = entry.task.extract(text, spec.params)
            records.append({
                "index": sample.index, "depth": sample.depth, "needle_depth": sample.meta["needle_depths"][0],
                "prompt_tokens": sample.meta["prompt_tokens"],
                "prompt_sha1": hashlib.sha1(sample.prompt.encode()).hexdigest(), "prompt_tail": sample.prompt[-160:],
                "answer": sample.answer, "generation": text, "extracted": extracted,
                "correct": extracted.strip().lower() == sample.answer.strip().lower(),
                "batch_rows": len(samples), "kv_bytes": kv_bytes / len(samples),
                "kv_bytes_max": out["kv_bytes_max"] / len(samples), "cache_tokens": cache_tokens,
                "prefill_tokens_per_s": out["prefill_tokens"] / out["prefill_s"],
                "decode_tokens_per_s": out["decode_tokens"] / out["decode_s"] if out["decode_s"] > 0 else None,
            })
        if progress is not None:
            progress(len(samples))
    return records


_TEXT_IDS: dict = {}


def _text_ids(source: str, tokenizer) -> torch.Tensor:
    """Token ids of a whole text source, cached per (source, tokenizer)."""
    from .text_sources import load_text

    key = (source, id(tokenizer))
    if key not in _TEXT_IDS:
        ids = tokenizer(load_text(source), add_special_tokens=False)["input_ids"]
        _TEXT_IDS[key] = (tokenizer, torch.tensor(ids, dtype=torch.long))  # holding the tokenizer keeps its id unique
    return _TEXT_IDS[key][1]


def perplexity_shard(run: Run, model, tokenizer, indices: list[int], progress=None) -> list[dict]:
    """Perplexity of consecutive text windows `indices` (prefix + eval tokens each), one fresh cache per window;
    `progress(n)` (optional) after each forward that scored n tokens."""
    cfg = run.part
    ids, width = _text_ids(cfg.source, tokenizer), cfg.prefix_length + cfg.eval_length
    if ids.numel() < width * cfg.windows:
        raise ValueError(f"perplexity.source={cfg.source!r} has {ids.numel()} tokens; need windows x (prefix + eval) "
                         f"= {width * cfg.windows}")
    records = []
    for w in indices:
        cache = build_cache(run.cache.strategy, model, **run.cache.params)
        window = ids[w * width : (w + 1) * width][None]  # [1, prefix + eval]
        result = perplexity_through_cache(model, window, cache, cfg.prefix_length, cfg.chunk_size, progress)
        records.append({"index": w, **result, "cache_tokens": int(cache.get_seq_length())})
    return records


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def aggregate(run: Run, records: list[dict]) -> dict:
    """Run-level metrics from every record (all processes); exact match through the `evaluate` module."""
    metrics = {
        "kv_bytes": sum(r["kv_bytes"] for r in records) / len(records),  # mean per sample / window, at the end
        "kv_bytes_max": max(r["kv_bytes_max"] for r in records),  # largest after any forward, per sample / window
        # perplexity: mean over the states after each forward (a saw-tooth cache compares fairly by it); tasks: None
        "kv_bytes_mean": (sum(r["kv_bytes_mean"] for r in records) / len(records)
                          if all("kv_bytes_mean" in r for r in records) else None),
        "cache_tokens": sum(r["cache_tokens"] for r in records),
        "prefill_tokens_per_s": _median(r["prefill_tokens_per_s"] for r in records),
        "decode_tokens_per_s": _median(r["decode_tokens_per_s"] for r in records),
        "n": len(records),
    }
    if run.kind == "perplexity":
        tokens = sum(r["eval_tokens"] for r in records)
        nll = sum(r["nll"] * r["eval_tokens"] for r in records) / tokens
        metrics.update(perplexity=math.exp(nll), nll=nll, eval_tokens=tokens, score=None)
    else:
        from .scoring import SCORER, exact_match

        metrics["score"] = exact_match([r["extracted"] for r in records], [r["answer"] for r in records])["exact_match"]
        metrics["scorer"] = SCORER
        by_depth = {}
        for r in records:
            by_depth.setdefault(str(r["depth"]), []).append(r["correct"])
        metrics["score_by_depth"] = {d: sum(v) / len(v) for d, v in sorted(by_depth.items())}
        metrics["perplexity"] = None
    return metrics


def compare_to_baseline(metrics: dict, baseline: dict | None) -> dict:
    """The project's conventions: KV ratio = measured bytes / DynamicCache's measured bytes (same tokens; < 1 is
    smaller), perplexity change = ours / DynamicCache's - 1 (a fraction; reports print it in %), plus the difference."""
    same_tokens = baseline is not None and baseline["cache_tokens"] == metrics["cache_tokens"]
    ratio = metrics["kv_bytes"] / baseline["kv_bytes"] if same_tokens and baseline["kv_bytes"] else None
    delta = change = None
    if baseline is not None and metrics.get("perplexity") is not None and baseline.get("perplexity") is not None:
        delta = metrics["perplexity"] - baseline["perplexity"]
        change = metrics["perplexity"] / baseline["perplexity"] - 1
    return {"kv_ratio_vs_dynamic": ratio, "perplexity_delta_vs_dynamic": delta, "perplexity_change_vs_dynamic": change}
