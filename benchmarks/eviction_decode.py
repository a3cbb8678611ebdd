"""Decode step time of the fixed-slot eviction cache, compiled by `generate`, against DynamicCache and StaticCache.

Llama-3.1-8B's shape with random bf16 weights (`gpu_decode.build_model`). Every row times `model.generate` itself, per
step (`generate_steps.measure_generate`: CUDA events recorded by a logits processor, a step = the gap between two;
first a short warm-up `generate` whose time, compile and CUDA-graph recording included, is reported apart as
`warmup_s`; then `cache.reset()` and the measured run, median over its steps). Per shape, in this order:
DynamicCache, StaticCache compiled, fixed-slot bf16 and int4 compiled (budget = `--ratio` of the prompt),
DynamicCache again last (the warm figure ratios use). Flatness: the fixed-slot caches at the same budget in tokens
(`--flat-budget`) for each `--flat-lengths` prompt. Capacity (`--capacity-length`): the largest batch whose compiled
fixed-slot int4 decode fits, and DynamicCache's, with tokens/s; to keep the lease short the prompt is prefilled once
(batch 1) and replicated with `batch_repeat_interleave` (the bytes a batch-B prefill leaves), then `generate`
continues from that cache (its first step moves the prompt into the slots).

    python benchmarks/eviction_decode.py                      # 8k x 1, 8k x 8, 32k x 4; 8k vs 32k; capacity at 32k
    python benchmarks/eviction_decode.py --kernel-rows --flat-lengths --capacity-length 0   # where attention runs:
        # + int4 through the torch step (vs the default int4 row: the Triton kernel), int8, bf16 through the kernel
    python benchmarks/eviction_decode.py --device cpu --small --grid 256x2 --flat-lengths 256 512 --flat-budget 64 \
        --capacity-length 256 --max-batch 4 --tokens 8        # a CPU smoke run of the code (aot_eager)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import transformers

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.eviction_decode
    from generate_steps import (
        AGAIN,
        GENERATE_CACHES,
        StepClock,
        _generate,
        measure_generate,
        print_capacity,
        print_table,
        reset_compiled_state,
        step_ms,
    )
    from gpu_decode import build_model, prefill
except ImportError:  # pragma: no cover
    from benchmarks.generate_steps import (
        AGAIN,
        GENERATE_CACHES,
        StepClock,
        _generate,
        measure_generate,
        print_capacity,
        print_table,
        reset_compiled_state,
        step_ms,
    )
    from benchmarks.gpu_decode import build_model, prefill

from kvpress_lite import EvictionCache, FixedSlotEvictionCache, cache_nbytes


def fixed_slot(policy: str, bits, ratio=None, budget=None, **options):
    """A `GENERATE_CACHES` entry: (factory(model, max_cache_len) -> FixedSlotEvictionCache, compiled=True)."""
    return (lambda model, n: FixedSlotEvictionCache(model, policy=policy, ratio=ratio, budget=budget, bits=bits,
                                                    **options), True)


# `--kernel-rows`: the decode step's attention computed elsewhere (docs/fixed-slot-eviction.md): int4 through the
# torch step (kernel_impl="sdpa") against the default int4 row (the Triton kernel on CUDA), int8 (kernel), and bf16
# slots through the kernel's residual path (bf16_kernel=True) against the default bf16 row (the torch step), and int4
# in groups of 64 channels (D / G = 2 at head_dim 128: kernel v3 instead of the generic v2 that groups of 32 take)
KERNEL_ROWS = {"int4 torch-step": (4, {"kernel_impl": "sdpa"}), "int8": (8, {}),
               "bf16 kernel": (None, {"bf16_kernel": True}), "int4 G64": (4, {"group_size": 64})}


STORAGE_KINDS = {"bf16": None, "int4": 4}


def add_caches(policy: str, ratio: float, budget: int, kernel_rows=(), kinds=tuple(STORAGE_KINDS)) -> dict:
    """Register the fixed-slot rows in `GENERATE_CACHES` (`kinds`: "bf16", "int4"; and the `KERNEL_ROWS` named in
    `kernel_rows`); returns the labels of the grid, the flatness and the kernel rows, and the capacity search's row
    (the last kind's: int4 by default)."""
    labels = {"grid": [], "flat": []}
    for name in kernel_rows:
        bits, options = KERNEL_ROWS[name]
        label = f"fixed-slot {policy} {ratio} {name} compiled"
        GENERATE_CACHES[label] = fixed_slot(policy, bits, ratio=ratio, **options)
        labels.setdefault("kernel", []).append(label)
    for name in kinds:
        bits = STORAGE_KINDS[name]
        grid, flat = f"fixed-slot {policy} {ratio} {name} compiled", f"fixed-slot {policy} {budget} {name} compiled"
        GENERATE_CACHES[grid] = fixed_slot(policy, bits, ratio=ratio)
        GENERATE_CACHES[flat] = fixed_slot(policy, bits, budget=budget)
        labels["grid"].append(grid)
        labels["flat"].append(flat)
        labels["capacity"] = grid
    return labels


def add_uncompiled(policies: list[str], ratio: float) -> list[str]:
    """Register `EvictionCache` rows (uncompiled, growing: timed warm, first run apart) for `policies`, bf16 and
    int4; returns their labels."""
    labels = []
    for policy in policies:
        for bits, name in ((None, "bf16"), (4, "int4")):
            label = f"EvictionCache {policy} {ratio} {name}"
            GENERATE_CACHES[label] = (
                lambda model, n, policy=policy, bits=bits: EvictionCache(model, policy=policy, ratio=ratio, bits=bits),
                False)
            labels.append(label)
    return labels


def capacity_row(model, label, factory, compiled, length, batch, tokens, compile_config, weights) -> dict | None:
    """Decode `tokens` steps through `generate` at `batch` rows replicated from a batch-1 prefill; None on OOM."""
    device = next(model.parameters()).device
    cache = None
    try:
        if compiled:
            reset_compiled_state()
        cache = factory(model, length + tokens + 8)
        ids1 = torch.randint(10, model.config.vocab_size, (1, length), device=device)
        token = prefill(model, cache, ids1)
        if hasattr(cache, "start_decoding"):
            cache.start_decoding()  # replicate the compact slots, not the prompt's full-precision storage
        cache.batch_repeat_interleave(batch)
        ids = torch.cat([ids1, token], dim=1).repeat_interleave(batch, 0)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        ids = _generate(model, ids, cache, 4, compiled, compile_config=compile_config)  # warm-up: compile, graphs
        warmup = time.perf_counter() - start
        clock = StepClock(device)  # continue from the same cache: generate feeds only the uncached last token
        _generate(model, ids, cache, tokens, compiled, clock, compile_config=compile_config)
        step = statistics.median(step_ms(clock)[2:])
        row = dict(cache=label, length=length, batch=batch, ms_per_step=step, tokens_per_s=batch * 1000 / step,
                   warmup_s=warmup, kv_gib=cache_nbytes(cache) / 2**30)
        if device.type == "cuda":
            row["peak_gib"] = (torch.cuda.max_memory_allocated() - weights) / 2**30
        return row
    except torch.OutOfMemoryError:
        return None
    finally:
        if cache is not None and hasattr(cache, "detach"):
            cache.detach()
        del cache
        if device.type == "cuda":
            torch.cuda.empty_cache()


def capacity(model, label, length, args, compile_config, weights) -> dict:
    """Largest batch (from an estimate by bytes per row, shrinking 12% per out-of-memory; with `--capacity-grow`,
    then growing 15% per try until one does not fit) and its tokens/s; `upper_bound_found`: a larger batch failed."""
    factory, compiled = GENERATE_CACHES[label]
    batch = args.max_batch
    if torch.cuda.is_available() and args.device == "cuda":
        probe = capacity_row(model, label, factory, compiled, length, 1, 4, compile_config, weights)
        free = torch.cuda.get_device_properties(0).total_memory - weights - args.margin_gib * 2**30
        if probe is not None:  # KV bytes per row, + 30% for the step's transients (dequantized slots, logits)
            batch = min(args.max_batch, max(1, int(free / 2**30 / max(1.3 * probe["kv_gib"], 1e-3))))
    tried, fit = [], None
    for _ in range(args.capacity_tries):
        tried.append(batch)
        row = capacity_row(model, label, factory, compiled, length, batch, args.tokens, compile_config, weights)
        if row is not None:
            fit = row
            break
        batch = max(1, int(batch * 0.88))
    if fit is None:
        return dict(cache=label, length=length, error=f"out of memory at batches {tried}")
    for _ in range(args.capacity_grow):  # the estimate fit: try larger batches until one does not (or the cap)
        if batch >= args.max_batch:
            break
        batch = min(args.max_batch, max(batch + 1, int(batch * 1.15)))
        tried.append(batch)
        row = capacity_row(model, label, factory, compiled, length, batch, args.tokens, compile_config, weights)
        if row is None:
            break
        fit = row
    # fits only grow, so every tried batch above the reported one ran out of memory
    return {**fit, "tried": tried, "capped": fit["batch"] == args.max_batch,
            "upper_bound_found": any(b > fit["batch"] for b in tried)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--grid", nargs="*", default=["8192x1", "8192x8", "32768x4"], help="LENGTHxBATCH points")
    parser.add_argument("--policy", default="h2o", help="fixed-slot policy (h2o, tova, snapkv, ...)")
    parser.add_argument("--ratio", type=float, default=0.25, help="fixed-slot budget as a fraction of the prompt")
    parser.add_argument("--kinds", nargs="*", default=list(STORAGE_KINDS), choices=list(STORAGE_KINDS),
                        help="fixed-slot storage rows (grid and flatness); none: only the other rows")
    parser.add_argument("--no-static", action="store_true",
                        help="leave out the StaticCache compiled row (its compile costs ~35 s per shape)")
    parser.add_argument("--uncompiled", nargs="*", default=[], metavar="POLICY",
                        help="also time the uncompiled EvictionCache with these policies, bf16 and int4")
    parser.add_argument("--flat-lengths", nargs="*", type=int, default=[8192, 32768])
    parser.add_argument("--flat-batch", type=int, default=4)
    parser.add_argument("--flat-budget", type=int, default=2048, help="tokens kept for every flatness prompt")
    parser.add_argument("--capacity-length", type=int, default=32768, help="0: no capacity search")
    parser.add_argument("--capacity-tries", type=int, default=5, help="tries shrinking 12%% per out-of-memory")
    parser.add_argument("--capacity-grow", type=int, default=0,
                        help="after the first batch that fits, up to this many tries 15%% larger until one does not "
                             "(0: the first fit, a lower bound; each compiled try recompiles, ~2 min at 32k)")
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--margin-gib", type=float, default=4.0)
    parser.add_argument("--tokens", type=int, default=64, help="timed decode steps per row")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a 2-layer toy model (smoke runs of this script)")
    parser.add_argument("--cpu-backend", default="aot_eager", help="torch.compile backend on a CPU")
    parser.add_argument("--also", nargs="*", default=[], choices=sorted(GENERATE_CACHES),
                        help="more generate rows per grid point, after StaticCache compiled (e.g. 'ours int4 static "
                             "compiled': the quantized and eviction caches side by side in one run)")
    parser.add_argument("--kernel-rows", nargs="*", default=None, choices=list(KERNEL_ROWS), metavar="ROW",
                        help="per grid point also these fixed-slot rows (none named: all of "
                             f"{list(KERNEL_ROWS)}): where the step's attention runs; after the default rows")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="after each grid row, profile this many decode steps of one more generate (kernels "
                             "launched, GPU time, CUDA-graph launches per step, top kernels)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    torch._dynamo.config.cache_size_limit = 64
    model = build_model(args.layers, args.device, args.small)
    kernel_rows = list(KERNEL_ROWS) if args.kernel_rows == [] else (args.kernel_rows or [])
    labels = add_caches(args.policy, args.ratio, args.flat_budget, kernel_rows, args.kinds)
    labels["grid"] += add_uncompiled(args.uncompiled, args.ratio)
    if args.capacity_length and "capacity" not in labels:
        parser.error("--capacity-length searches the last of --kinds: name one, or pass --capacity-length 0")
    weights = torch.cuda.memory_allocated() if args.device == "cuda" else 0
    compile_config = None
    if args.device == "cuda":
        print(f"GPU {torch.cuda.get_device_name()} torch {torch.__version__} transformers {transformers.__version__} "
              f"weights {weights / 2**30:.2f} GiB", flush=True)
    else:  # generate compiles on accelerators only: force it
        compile_config = transformers.CompileConfig(backend=args.cpu_backend, mode=None, fullgraph=True)
        compile_config._compile_all_devices = True
        print(f"device {args.device} torch {torch.__version__} transformers {transformers.__version__} "
              f"backend {args.cpu_backend}", flush=True)
    vocab = model.config.vocab_size

    def run(ids, label, as_label=None) -> dict:
        row = measure_generate(model, ids, label, new_tokens=args.tokens + 4, weights=weights,
                               compile_config=compile_config, profile_steps=0 if as_label else args.profile_steps)
        row["cache"] = as_label or label
        table = row.get("profile", {}).pop("table", "")
        print(json.dumps(row), flush=True)
        if table:
            print(table, flush=True)
        return row

    rows, flat_rows, cap_rows = [], [], []
    static = [] if args.no_static else ["StaticCache compiled"]
    for point in args.grid:
        length, batch = (int(x) for x in point.split("x"))
        ids = torch.randint(10, vocab, (batch, length), device=args.device)
        rows.append(run(ids, "DynamicCache"))
        for label in static + args.also + labels["grid"] + labels.get("kernel", []):
            rows.append(run(ids, label))
        rows.append(run(ids, "DynamicCache", "DynamicCache" + AGAIN))
    for length in args.flat_lengths:
        ids = torch.randint(10, vocab, (args.flat_batch, length), device=args.device)
        for label in labels["flat"]:
            flat_rows.append(run(ids, label))
    if args.capacity_length:
        for label in ["DynamicCache", labels["capacity"]]:
            row = capacity(model, label, args.capacity_length, args, compile_config, weights)
            cap_rows.append(row)
            print(json.dumps(row), flush=True)

    print_table(rows, f"Decode step through generate, fixed-slot {args.policy} at ratio {args.ratio}")
    if flat_rows:
        print_table(flat_rows, f"Flatness: fixed-slot {args.policy}, budget {args.flat_budget} tokens, batch "
               f"{args.flat_batch}")
    for label in labels["flat"]:
        ms = {r["length"]: r["ms_per_step"] for r in flat_rows if r["cache"] == label and "ms_per_step" in r}
        if len(ms) >= 2:
            lo, hi = min(ms), max(ms)
            print(f"{label}: {hi} vs {lo} prompt: {ms[hi] / ms[lo]:.3f}x")
    if cap_rows:
        print_capacity(cap_rows, args.capacity_length)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"generate": rows, "flat": flat_rows, "capacity": cap_rows}, handle, indent=1)


if __name__ == "__main__":
    main()
