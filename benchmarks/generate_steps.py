"""Decode step time as `model.generate` runs it, compiled caches included (imported by gpu_decode.py).

A compiled cache is only fast through `generate`'s own compile of the decode step (transformers compiles when the
cache `is_compileable`, with CUDA graphs by default), so these rows time `generate` itself: a logits processor records
an event every step (CUDA events on a GPU, `perf_counter` on a CPU), and a step is the gap between two consecutive
events: forward, sampling, `generate`'s bookkeeping and the next step's input preparation, i.e. what a user waits
for. Each row runs `generate` twice with the same cache object: first a short warm-up (prefill, compile, CUDA-graph
recording: reported as `warmup_s`), then, after `cache.reset()`, the measured run; ms/step is the median over its
steps after the first `skip`. Before every compiled row dynamo and the CUDA-graph trees are reset, so `warmup_s` is
the full price a first call pays.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, StaticCache

from kvpress_lite import QuantizedKVCache, StaticQuantizedKVCache, cache_kwarg, cache_nbytes


def _static_quantized(bits):
    return lambda model, n: StaticQuantizedKVCache(model, bits=bits, max_cache_len=n, fused=True)


# label -> (factory(model, max_cache_len) -> cache, compiled by generate)
GENERATE_CACHES = {
    "DynamicCache": (lambda model, n: DynamicCache(config=model.config), False),
    "ours int4 (QuantizedKVCache)": (lambda model, n: QuantizedKVCache(model, bits=4), False),
    "StaticCache compiled": (lambda model, n: StaticCache(config=model.config, max_cache_len=n), True),
    "ours int4 static compiled": (_static_quantized(4), True),
    "ours int8 static compiled": (_static_quantized(8), True),
}


class StepClock(LogitsProcessor):
    """Records one timestamp per decode step (called by `generate` after each forward)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def __call__(self, input_ids, scores):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
        return scores

    def step_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1000 for a, b in zip(self.marks, self.marks[1:])]


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_compiled_state() -> None:
    """Forget compiled graphs and CUDA-graph pools, so the next compiled row pays (and reports) its own compile."""
    torch._dynamo.reset()
    if torch.cuda.is_available():
        from torch._inductor import cudagraph_trees

        cudagraph_trees.reset_cudagraph_trees()
        torch.cuda.empty_cache()


def _generate(model, ids, cache, new_tokens, compiled, clock=None, compile_config=None):
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  disable_compile=not compiled, **{cache_kwarg(model): cache})
    if compile_config is not None:
        kwargs["compile_config"] = compile_config
    if clock is not None:
        kwargs["logits_processor"] = LogitsProcessorList([clock])
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)


def measure_generate(model, ids, label, new_tokens=64, warm_tokens=8, skip=4, weights=0, compile_config=None):
    """One row: warm-up `generate` (timed as `warmup_s`), `cache.reset()`, then `new_tokens` timed steps."""
    factory, compiled = GENERATE_CACHES[label]
    batch, length = ids.shape
    row = dict(cache=label, length=length, batch=batch, compiled=compiled)
    device = ids.device
    cache = None
    try:
        if compiled:
            reset_compiled_state()
        cache = factory(model, length + new_tokens)
        _sync(device)
        start = time.perf_counter()
        _generate(model, ids, cache, warm_tokens, compiled, compile_config=compile_config)
        _sync(device)
        row["warmup_s"] = time.perf_counter() - start
        cache.reset()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        clock = StepClock(device)
        _generate(model, ids, cache, new_tokens, compiled, clock, compile_config=compile_config)
        ms = clock.step_ms()[skip:]
        row.update(ms_per_step=statistics.median(ms), ms_min=min(ms), ms_max=max(ms),
                   kv_gib=cache_nbytes(cache) / 2**30, fused=bool(getattr(cache, "fused", False)))
        if device.type == "cuda":
            row["peak_gib"] = (torch.cuda.max_memory_allocated() - weights) / 2**30
    except Exception as err:  # report and go on: one failing cache must not cost the lease
        row["error"] = repr(err)[:300]
    finally:
        if cache is not None and hasattr(cache, "detach"):
            cache.detach()
        del cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def print_table(rows) -> None:
    """Markdown table of `measure_generate` rows, ratios against the same shape's DynamicCache / StaticCache rows."""
    print("\n| length x batch | cache | ms/step | vs DynamicCache | vs StaticCache compiled | warm-up s | KV GiB | "
          "peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['length']} x {r['batch']} | {r['cache']} | error: {r['error'][:120]} | | | | | |")
            continue
        same = {x["cache"]: x["ms_per_step"] for x in rows
                if x["length"] == r["length"] and x["batch"] == r["batch"] and "ms_per_step" in x}
        ratio = [r["ms_per_step"] / same[k] if k in same else float("nan")
                 for k in ("DynamicCache", "StaticCache compiled")]
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else ""
        print(f"| {r['length']} x {r['batch']} | {r['cache']} | {r['ms_per_step']:.2f} | {ratio[0]:.2f} | "
              f"{ratio[1]:.2f} | {r['warmup_s']:.1f} | {r['kv_gib']:.2f} | {peak} |")
