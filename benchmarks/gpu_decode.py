"""Decode step time, KV bytes and peak memory of each cache at Llama-3.1-8B shape on one GPU (random bf16 weights).

Method (docs/design/measuring.md): per (length, batch), one cache alive at a time, all rows from one process:
prefill the prompt in one forward (`logits_to_keep=1`), then greedy decoding forwards; each decode forward is timed
with CUDA events around the forward alone (no `generate` bookkeeping, no prefill in the figure), after a warm run at
the same shape (DynamicCache, not reported) and `--warm` untimed decode steps; ms/step is the median of `--steps`
timed steps. DynamicCache is measured first and again last at each shape (drift check). KV GiB = `cache_nbytes` after
the last step; peak = `max_memory_allocated` above the weights over prefill + decoding.

Capacity (`--capacity-length`): the largest batch whose decode runs at that length, per cache. To keep the lease
short the prompt is prefilled once (batch 1) and the cache is replicated to batch B with `batch_repeat_interleave`
(the same bytes a batch-B prefill leaves; the prefill's own activation peak at batch B is not part of it); B starts
from the measured bytes per row and shrinks by 12% after an out-of-memory error.

    python benchmarks/gpu_decode.py --grid 8192x1 8192x8 32768x1 32768x4 --capacity-length 32768

Compiled caches (`--generate-grid`): `StaticCache` and `StaticQuantizedKVCache` are fast only through `generate`'s
own compile of the decode step, so a second table times `generate` itself, per step, for them and for DynamicCache
and QuantizedKVCache at the same shapes (benchmarks/generate_steps.py: method; every row warm, a growing cache's
first run at the shape reported apart, DynamicCache measured first and again last at each shape).

    python benchmarks/gpu_decode.py --grid --generate-grid 8192x1 8192x8 32768x4
    python benchmarks/gpu_decode.py --device cpu --small --grid --generate-grid 256x2   # a CPU smoke run of the code
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kvpress_lite import build_cache, cache_kwarg, cache_nbytes

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.gpu_decode
    from generate_steps import AGAIN, GENERATE_CACHES, measure_generate, print_capacity, print_table
except ImportError:  # pragma: no cover
    from benchmarks.generate_steps import AGAIN, GENERATE_CACHES, measure_generate, print_capacity, print_table

CACHES = {
    "DynamicCache": ("dynamic", {}),
    "QuantizedCache quanto int4": ("hf-quantized", {"backend": "quanto", "bits": 4}),
    "ours int8": ("quantized", {"bits": 8}),
    "ours int4": ("quantized", {"bits": 4}),
    "ours int4, dequantize path": ("quantized", {"bits": 4, "fused": False}),
    "snapkv 0.25 + int4": ("snapkv", {"ratio": 0.25, "bits": 4}),
    "h2o 0.25": ("h2o", {"ratio": 0.25}),
    "snapkv 0.25": ("snapkv", {"ratio": 0.25}),
    "h2o 0.25 + int4": ("h2o", {"ratio": 0.25, "bits": 4}),
}
DEFAULT_CACHES = list(CACHES)[:6]  # the eviction rows after them are asked for by name (issue 18's grid)
CAPACITY_CACHES = ["DynamicCache", "ours int8", "ours int4", "snapkv 0.25 + int4"]  # quanto: see --help


def build_model(layers: int, device: str = "cuda", small: bool = False):
    """Llama-3.1-8B's shape, `layers` layers, random bf16 weights (`small`: a 2-layer toy of it, for smoke runs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256)
    if small:
        shape = dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2,
                     vocab_size=2048)
        layers = 2
    config = LlamaConfig(num_hidden_layers=layers, head_dim=128 if not small else 64, max_position_embeddings=131072,
                         rope_theta=500000.0, attn_implementation="sdpa", **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    for p in model.parameters():  # random but well-scaled weights
        torch.nn.init.normal_(p, std=0.02)
    return model.eval()


def timed_generate(model, ids, name, params, new_tokens, prefill_chunk_size=None):
    """Greedy generate of exactly `new_tokens` with a fresh cache `name(**params)`: (seconds, cache).
    (Used by prefill_memory.py; this script times decode forwards directly, see `decode`.)"""
    cache = build_cache(name, model, **params)
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, prefill_chunk_size=prefill_chunk_size, **{cache_kwarg(model): cache})
    torch.cuda.synchronize()
    return time.perf_counter() - start, cache


PREFILL_CHUNK = 0  # --prefill-chunk: 0 = the prompt in one forward


@torch.no_grad()
def prefill(model, cache, ids):
    """The prompt in one forward, or in forwards of `PREFILL_CHUNK` tokens (the activation peak of one chunk instead
    of the whole prompt, as `generate(prefill_chunk_size=...)` does); returns the first generated token `[B, 1]`."""
    chunk = PREFILL_CHUNK or ids.shape[1]
    for start in range(0, ids.shape[1], chunk):
        out = model(input_ids=ids[:, start : start + chunk], logits_to_keep=1, use_cache=True,
                    **{cache_kwarg(model): cache})
    return out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def decode(model, cache, token, warm: int, steps: int) -> list[float]:
    """`warm` untimed then `steps` timed greedy decode forwards; ms of each timed forward (CUDA events)."""
    kwarg = cache_kwarg(model)
    events = []
    for i in range(warm + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = model(input_ids=token, logits_to_keep=1, use_cache=True, **{kwarg: cache})
        end.record()
        token = out.logits[:, -1:].argmax(-1)
        if i >= warm:
            events.append((start, end))
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in events]


def release(cache) -> None:
    if hasattr(cache, "detach"):
        cache.detach()


def measure(model, ids, label, weights, warm, steps) -> dict:
    name, params = CACHES[label]
    batch, length = ids.shape
    row = dict(cache=label, length=length, batch=batch)
    cache = None
    try:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        cache = build_cache(name, model, **params)
        token = prefill(model, cache, ids)
        ms = decode(model, cache, token, warm, steps)
        row.update(ms_per_step=statistics.median(ms), ms_min=min(ms), ms_max=max(ms),
                   kv_gib=cache_nbytes(cache) / 2**30,
                   peak_gib=(torch.cuda.max_memory_allocated() - weights) / 2**30,
                   fused=bool(getattr(cache, "fused", False)))
    except Exception as err:  # report and go on: one failing cache must not cost the lease
        row["error"] = repr(err)[:300]
    finally:
        if cache is not None:
            release(cache)
        del cache
        torch.cuda.empty_cache()
    return row


def fits(model, ids1, label, batch, warm, steps, weights) -> dict | None:
    """Decode at `batch` rows replicated from a batch-1 prefill of `ids1`; None on out-of-memory."""
    name, params = CACHES[label]
    cache = None
    try:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        cache = build_cache(name, model, **params)
        token = prefill(model, cache, ids1)
        cache.batch_repeat_interleave(batch)
        ms = decode(model, cache, token.repeat_interleave(batch, 0), warm, steps)
        step = statistics.median(ms)
        return dict(cache=label, length=ids1.shape[1], batch=batch, ms_per_step=step,
                    tokens_per_s=batch * 1000 / step, kv_gib=cache_nbytes(cache) / 2**30,
                    peak_gib=(torch.cuda.max_memory_allocated() - weights) / 2**30)
    except torch.OutOfMemoryError:
        return None
    finally:
        if cache is not None:
            release(cache)
        del cache
        torch.cuda.empty_cache()


def capacity(model, length, label, per_row_gib, weights, args) -> dict:
    total = torch.cuda.get_device_properties(0).total_memory
    free_gib = (total - weights) / 2**30 - args.margin_gib
    batch = min(args.max_batch, max(1, int(free_gib / per_row_gib)))
    ids1 = torch.randint(1000, 100000, (1, length), device="cuda")
    tried = []
    for _ in range(args.capacity_tries):
        tried.append(batch)
        row = fits(model, ids1, label, batch, 2, args.capacity_steps, weights)
        if row is not None:
            row["tried"] = tried
            row["capped"] = batch == args.max_batch
            return row
        batch = max(1, int(batch * 0.88))
    return dict(cache=label, length=length, error=f"out of memory at batches {tried}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--grid", nargs="*", default=["8192x1", "8192x8", "32768x1", "32768x4"],
                        help="LENGTHxBATCH points")
    parser.add_argument("--caches", nargs="+", default=DEFAULT_CACHES, choices=list(CACHES))
    parser.add_argument("--warm", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--capacity-length", type=int, default=0, help="0: no capacity search")
    parser.add_argument("--capacity-caches", nargs="+", default=CAPACITY_CACHES,
                        help="quanto's QuantizedCache cannot be replicated along batch (its quantized tensors are "
                             "not repeated by batch_repeat_interleave), so it is left out")
    parser.add_argument("--capacity-steps", type=int, default=6)
    parser.add_argument("--capacity-tries", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--margin-gib", type=float, default=6.0)
    parser.add_argument("--generate-grid", nargs="*", default=[], help="LENGTHxBATCH points timed through generate")
    parser.add_argument("--generate-caches", nargs="+", default=list(GENERATE_CACHES))
    parser.add_argument("--generate-tokens", type=int, default=64, help="timed steps per generate row (+ a few)")
    parser.add_argument("--prefill-chunk", type=int, default=0,
                        help="prefill the grid's prompts in chunks of this many tokens (peak memory of a chunked "
                             "prefill, for every cache alike); 0: one forward")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a 2-layer toy model (smoke runs of this script)")
    parser.add_argument("--model", default=None, help="a real model for the generate rows instead of the random "
                        "8B shape, e.g. smollm2-135m (kvpress_lite.load_model, bf16)")
    parser.add_argument("--cpu-backend", default="aot_eager",
                        help="torch.compile backend on a CPU: aot_eager (checks the graph, fast) or inductor (speed)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads on a CPU (0: torch's default)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    import transformers

    global PREFILL_CHUNK
    PREFILL_CHUNK = args.prefill_chunk
    torch._dynamo.config.cache_size_limit = 64  # one recompile per cache type and shape, never the eager fallback
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        from kvpress_lite import load_model

        model = load_model(args.model, dtype=torch.bfloat16, device=args.device)[0]
    else:
        model = build_model(args.layers, args.device, args.small)
    vocab = model.config.vocab_size
    if args.device == "cuda":
        import triton

        weights = torch.cuda.memory_allocated()
        print(f"GPU {torch.cuda.get_device_name()} torch {torch.__version__} transformers {transformers.__version__} "
              f"triton {triton.__version__} weights {weights / 2**30:.2f} GiB", flush=True)
    else:
        weights = 0
        print(f"device {args.device} torch {torch.__version__} ({torch.get_num_threads()} threads) transformers "
              f"{transformers.__version__} model {args.model or 'random Llama'} compile backend {args.cpu_backend}",
              flush=True)
    compile_config = None
    if args.device == "cpu":  # generate compiles on accelerators only: force it (aot_eager: checks the graph, fast)
        compile_config = transformers.CompileConfig(backend=args.cpu_backend, mode=None, fullgraph=True)
        compile_config._compile_all_devices = True
    gen_rows = []
    for point in args.generate_grid:
        length, batch = (int(x) for x in point.split("x"))
        ids = torch.randint(10, vocab, (batch, length), device=args.device)
        again = ["DynamicCache" + AGAIN] if "DynamicCache" in args.generate_caches else []
        for label in args.generate_caches + again:  # DynamicCache first and again last (drift check; ratios: last)
            row = measure_generate(model, ids, label, new_tokens=args.generate_tokens + 4, weights=weights,
                                   compile_config=compile_config)
            gen_rows.append(row)
            print(json.dumps(row), flush=True)
    if gen_rows:
        print_table(gen_rows)
    if not args.grid:
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"generate": gen_rows}, handle, indent=1)
        return
    short = torch.randint(1000, 100000, (2, 512), device="cuda")
    for label in args.caches:  # warm-up: kernels compiled, allocator primed, for every cache
        measure(model, short, label, weights, 2, 2)
    rows = []
    for point in args.grid:
        length, batch = (int(x) for x in point.split("x"))
        ids = torch.randint(1000, 100000, (batch, length), device="cuda")
        measure(model, ids, "DynamicCache", weights, args.warm, 4)  # a warm run at this shape, not reported
        for label in args.caches + (["DynamicCache"] if "DynamicCache" in args.caches else []):
            row = measure(model, ids, label, weights, args.warm, args.steps)
            if any(r["cache"] == label and r["length"] == length and r["batch"] == batch for r in rows):
                row["cache"] = label + " (again, last)"  # drift check: the first row measured again at the end
            rows.append(row)
            print(json.dumps(row), flush=True)
    cap_rows = []
    if args.capacity_length:
        for label in args.capacity_caches:
            ref = [r for r in rows if r["cache"] == label and r["length"] == args.capacity_length and "kv_gib" in r]
            per_row = min(r["kv_gib"] / r["batch"] for r in ref) if ref else 4.5
            row = capacity(model, args.capacity_length, label, per_row, weights, args)
            cap_rows.append(row)
            print(json.dumps(row), flush=True)

    print("\n| length x batch | cache | ms/step | vs DynamicCache | vs quanto int4 | KV GiB | peak above weights GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['length']} x {r['batch']} | {r['cache']} | error: {r['error'][:120]} | | | | |")
            continue
        same = {x["cache"]: x for x in rows if x["length"] == r["length"] and x["batch"] == r["batch"]
                and "ms_per_step" in x}
        ratio = {k: (same[k]["ms_per_step"] / r["ms_per_step"]) if k in same else float("nan")
                 for k in ("DynamicCache", "QuantizedCache quanto int4")}
        print(f"| {r['length']} x {r['batch']} | {r['cache']} | {r['ms_per_step']:.2f} | "
              f"{ratio['DynamicCache']:.2f}x | {ratio['QuantizedCache quanto int4']:.2f}x | {r['kv_gib']:.2f} | "
              f"{r['peak_gib']:.2f} |")
    if cap_rows:
        print_capacity(cap_rows, args.capacity_length)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"grid": rows, "capacity": cap_rows, "generate": gen_rows}, handle, indent=1)


if __name__ == "__main__":
    main()
