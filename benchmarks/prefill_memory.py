"""Peak memory of a long prefill: eviction with chunked prefill vs DynamicCache, Llama-3.1-8B shape on one GPU.

`model.generate(..., prefill_chunk_size=C)` feeds the prompt in chunks of C tokens; an eviction cache with
`budget=b` evicts after every chunk, so it never holds more than b + C tokens per layer while DynamicCache grows
to the whole prompt. Random bf16 weights (speed and memory need no trained weights), SDPA, greedy, `--new-tokens`
generated. Peak = `max_memory_allocated` above the weights over the whole generate; one cache alive at a time.

    python benchmarks/prefill_memory.py --length 32768 --chunk 4096 --budget 4096 [--batch 4]
"""

from __future__ import annotations

import argparse
import json

import torch

from kvpress_lite import cache_nbytes

try:
    from gpu_decode import build_model, timed_generate
except ImportError:  # run as a module from the repository root
    from benchmarks.gpu_decode import build_model, timed_generate


def run(model, ids, strategy: str, params: dict, chunk: int | None, new_tokens: int) -> dict:
    weights = torch.cuda.memory_allocated()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    seconds, cache = timed_generate(model, ids, strategy, params, new_tokens, prefill_chunk_size=chunk)
    row = dict(cache=strategy, params=params, chunk=chunk, seconds=round(seconds, 3),
               kv_gib=round(cache_nbytes(cache) / 2**30, 3),
               peak_gib=round((torch.cuda.max_memory_allocated() - weights) / 2**30, 3))
    if hasattr(cache, "detach"):
        cache.detach()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--policies", nargs="+", default=["snapkv", "tova", "h2o", "knorm", "streaming"])
    args = parser.parse_args()
    model = build_model(args.layers)
    print(f"GPU {torch.cuda.get_device_name()} torch {torch.__version__} "
          f"weights {torch.cuda.memory_allocated() / 2**30:.2f} GiB", flush=True)
    ids = torch.randint(1000, 100000, (args.batch, args.length), device="cuda")
    run(model, ids[:, :512], "dynamic", {}, 256, 2)  # warm-up
    plans = [("dynamic", {}, None), ("dynamic", {}, args.chunk)]
    plans += [(policy, {"budget": args.budget}, args.chunk) for policy in args.policies]
    plans += [("snapkv", {"budget": args.budget}, None)]
    rows = []
    for strategy, params, chunk in plans:
        try:
            row = run(model, ids, strategy, params, chunk, args.new_tokens)
        except Exception as err:  # report and go on: one failing cache must not cost the lease
            row = dict(cache=strategy, params=params, chunk=chunk, error=repr(err)[:300])
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nbatch {args.batch}, {args.length} prompt tokens + {args.new_tokens} generated")
    print("| cache | prefill chunk | generate s | KV GiB at end | peak GiB |")
    print("|---|---|---|---|---|")
    for r in rows:
        name = r["cache"] + (f" budget {r['params']['budget']}" if r["params"] else "")
        if "error" in r:
            print(f"| {name} | {r['chunk']} | error: {r['error']} | | |")
        else:
            print(f"| {name} | {r['chunk'] or 'none'} | {r['seconds']:.2f} | {r['kv_gib']:.3f} | {r['peak_gib']:.2f} |")


if __name__ == "__main__":
    main()
