"""Decode step time as `model.generate` runs it, compiled caches included (imported by gpu_decode.py).

A compiled cache is only fast through `generate`'s own compile of the decode step (transformers compiles when the
cache `is_compileable`, with CUDA graphs by default), so these rows time `generate` itself: the harness's `StepClock`
(eval/generation.py, a logits processor) stamps every step, and a step is the gap between two consecutive stamps:
forward, sampling, `generate`'s bookkeeping and the next step's input preparation, i.e. what a user waits for.
ms/step is the median over the measured run's steps after the first `skip`.

Warm-up, the same for every row (a row's first run at a shape is never its figure):
- compiled caches: a short `generate` (prefill, compile, CUDA-graph recording: `warmup_s`), then `cache.reset()`
  (the buffers, and so the recorded graphs, are kept) and the measured run. Before every compiled row dynamo and the
  CUDA-graph trees are reset, so `warmup_s` is the full price a first call pays.
- growing caches (DynamicCache, QuantizedKVCache): a full first run at the same shape, timed like the measured one and
  reported apart (`first_ms_per_step`, `warmup_s`: its first run grows the allocator step by step through
  `torch.cat`), then the measured run with a *fresh* cache. Never `reset()` and reuse: transformers 5.17's
  `DynamicLayer.reset()` zeroes its tensors but keeps them, so the reused cache held the warm-up's L + 7 zeroed tokens
  and the measured run prefilled on top of them (2L keys, a dense mask: `[4, 1, 32761, 65536]` bf16 = 16 GiB at
  32k x 4, the out-of-memory seen on the H100; and 60-150 ms decode steps over 2L keys at the other shapes).
gpu_decode.py measures DynamicCache again last at each shape; ratios use that last figure.
"""

from __future__ import annotations

import pathlib
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, StaticCache

from kvpress_lite import QuantizedKVCache, StaticQuantizedKVCache, cache_kwarg, cache_nbytes

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the checkout's eval/ (not in the wheel)
from eval.generation import StepClock  # noqa: E402


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
AGAIN = " (again, last)"


def step_ms(clock: StepClock) -> list[float]:
    """ms between consecutive steps of `clock` (its first stamp ends the prefill)."""
    return [(b - a) * 1000 for a, b in zip(clock.times, clock.times[1:])]


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


def _release(cache) -> None:
    if cache is not None and hasattr(cache, "detach"):
        cache.detach()


class ProfileWindow(LogitsProcessor):
    """Runs `torch.profiler` over decode steps `start` to `start + steps` of one `generate` (a logits processor is
    called once per forward, so the window holds exactly `steps` whole steps and no prefill)."""

    def __init__(self, start: int, steps: int, device: torch.device):
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.profiler = profile(activities=activities)
        self.start, self.steps, self.calls, self.device = start, steps, 0, device

    def __call__(self, input_ids, scores):
        if self.calls in (self.start, self.start + self.steps):
            _sync(self.device)
            (self.profiler.start if self.calls == self.start else self.profiler.stop)()
        self.calls += 1
        return scores

    def summary(self, top: int = 12) -> dict:
        """Per step: device kernels launched (a CUDA-graph replay counts its kernels; on a CPU, top-level aten ops),
        their device time, CUDA-graph launches, and the top ops by device (CPU: host) time as a table."""
        events, n = self.profiler.events(), self.steps
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        ops = kernels or [e for e in events if e.name.startswith("aten::") and e.cpu_parent is None]
        table = self.profiler.key_averages().table(
            sort_by="self_device_time_total" if kernels else "self_cpu_time_total", row_limit=top,
            max_name_column_width=60)
        return dict(launches_per_step=len(ops) / n, kernel_ms_per_step=sum(e.device_time for e in kernels) / 1000 / n,
                    graph_launches_per_step=sum(1 for e in events if e.name == "cudaGraphLaunch") / n, table=table)


def measure_generate(model, ids, label, new_tokens=64, warm_tokens=8, skip=4, weights=0, compile_config=None,
                     profile_steps=0):
    """One row: the warm-up of the module docstring (timed as `warmup_s`), then `new_tokens` measured steps; with
    `profile_steps`, then one more `generate` whose decode steps 4 to 4 + `profile_steps` run under the profiler
    (the same cache after `reset()` when compiled, so the recorded graphs; a fresh one otherwise): the row's
    `profile` (`ProfileWindow.summary`)."""
    factory, compiled = GENERATE_CACHES[label.removesuffix(AGAIN)]
    batch, length = ids.shape
    row = dict(cache=label, length=length, batch=batch, compiled=compiled)
    device = ids.device
    cache = None
    try:
        if compiled:
            reset_compiled_state()
        cache = factory(model, length + new_tokens)
        first = None if compiled else StepClock(device)
        _sync(device)
        start = time.perf_counter()
        _generate(model, ids, cache, warm_tokens if compiled else new_tokens, compiled, first,
                  compile_config=compile_config)
        _sync(device)
        row["warmup_s"] = time.perf_counter() - start
        if compiled:
            cache.reset()  # keeps the buffers, so the recorded graphs
        else:
            row["first_ms_per_step"] = statistics.median(step_ms(first)[skip:])
            _release(cache)
            cache = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            cache = factory(model, length + new_tokens)  # fresh: see the module docstring
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        clock = StepClock(device)
        _generate(model, ids, cache, new_tokens, compiled, clock, compile_config=compile_config)
        ms = step_ms(clock)[skip:]
        row.update(ms_per_step=statistics.median(ms), ms_min=min(ms), ms_max=max(ms),
                   kv_gib=cache_nbytes(cache) / 2**30, fused=bool(getattr(cache, "fused", False)))
        if device.type == "cuda":
            row["peak_gib"] = (torch.cuda.max_memory_allocated() - weights) / 2**30
        if profile_steps:
            if compiled:
                cache.reset()
            else:
                _release(cache)
                cache = None
                cache = factory(model, length + new_tokens)
            window = ProfileWindow(4, profile_steps, device)
            _generate(model, ids, cache, profile_steps + 6, compiled, window, compile_config=compile_config)
            row["profile"] = window.summary()
    except Exception as err:  # report and go on: one failing cache must not cost the lease
        row["error"] = repr(err)[:300]
    finally:
        _release(cache)
        del cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def print_capacity(rows, length: int) -> None:
    """The capacity search's table (gpu_decode.py, eviction_decode.py): largest batch at `length`, its step and
    tokens/s, KV GiB, peak GiB where measured, the batches tried."""
    peak = any("peak_gib" in r for r in rows)
    cols = ["cache", f"largest batch at {length}", "ms/step", "tokens/s", "KV GiB"] + (["peak GiB"] if peak else [])
    print("\n| " + " | ".join(cols + ["tried"]) + " |")
    print("|" + "---|" * (len(cols) + 1))
    for r in rows:
        if "error" in r:
            print(f"| {r['cache']} | {r['error']} |" + " |" * (len(cols) - 1))
            continue
        cells = [r["cache"], f"{r['batch']}{' (cap)' if r['capped'] else ''}", f"{r['ms_per_step']:.1f}",
                 f"{r['tokens_per_s']:.0f}", f"{r['kv_gib']:.2f}"] + ([f"{r.get('peak_gib', float('nan')):.1f}"]
                                                                       if peak else [])
        print("| " + " | ".join(cells + [str(r["tried"])]) + " |")


def print_table(rows, title: str = "") -> None:
    """Markdown table of `measure_generate` rows under `title`; ratios against the same shape's DynamicCache (its last
    measurement) and StaticCache rows; a growing cache's first run at the shape in its own column."""
    print(f"\n{title}" if title else "")
    print("| length x batch | cache | ms/step | first run ms/step | vs DynamicCache | vs StaticCache compiled | "
          "warm-up s | KV GiB | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['length']} x {r['batch']} | {r['cache']} | error: {r['error'][:120]} | | | | | | |")
            continue
        same = {x["cache"]: x["ms_per_step"] for x in rows
                if x["length"] == r["length"] and x["batch"] == r["batch"] and "ms_per_step" in x}
        dynamic = same.get("DynamicCache" + AGAIN, same.get("DynamicCache", float("nan")))
        ratio = [r["ms_per_step"] / dynamic, r["ms_per_step"] / same.get("StaticCache compiled", float("nan"))]
        first = f"{r['first_ms_per_step']:.2f}" if "first_ms_per_step" in r else ""
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else ""
        print(f"| {r['length']} x {r['batch']} | {r['cache']} | {r['ms_per_step']:.2f} | {first} | {ratio[0]:.2f} | "
              f"{ratio[1]:.2f} | {r['warmup_s']:.1f} | {r['kv_gib']:.2f} | {peak} |")
