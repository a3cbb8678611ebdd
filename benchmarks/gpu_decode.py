"""Decode speed and peak memory of each cache at Llama-3.1-8B shape on one GPU (random bf16 weights).

Weights are random (no trained weights are needed for speed); SDPA attention; `model.generate`
greedy with a fixed number of new tokens. ms/step = (t(prompt + N new) - t(prompt + 1 new)) / (N - 1),
best of `--repeats` after a warm-up, all caches in one process. Peaks = max_memory_allocated minus the
weights, during prefill (+1 token) and during the whole generate, one cache alive at a time.

    python benchmarks/gpu_decode.py --lengths 8192 32768 --batches 1 8 --new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kvpress_lite import build_cache, cache_nbytes
from kvpress_lite._compat import cache_kwarg

CACHES = {
    "dynamic": ("dynamic", {}),
    "kvpress_lite int8": ("quantized", {"bits": 8}),
    "kvpress_lite int4": ("quantized", {"bits": 4}),
    "QuantizedCache quanto int4": ("hf-quantized", {"backend": "quanto", "bits": 4}),
    "h2o ratio 0.5": ("h2o", {"ratio": 0.5}),
    "knorm ratio 0.5": ("knorm", {"ratio": 0.5}),
}


def build_model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
        rope_theta=500000.0, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    for p in model.parameters():  # random but well-scaled weights
        torch.nn.init.normal_(p, std=0.02)
    return model.eval()


def timed_generate(model, ids, name, params, new_tokens, prefill_chunk_size=None):
    """Greedy generate of exactly `new_tokens` with a fresh cache `name(**params)`: (seconds, cache)."""
    cache = build_cache(name, model, **params)
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, prefill_chunk_size=prefill_chunk_size, **{cache_kwarg(model): cache})
    torch.cuda.synchronize()
    return time.perf_counter() - start, cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192])
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--caches", nargs="+", default=list(CACHES))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model = build_model(args.layers)
    weights = torch.cuda.memory_allocated()
    print(f"GPU {torch.cuda.get_device_name()} torch {torch.__version__} weights {weights / 2**30:.2f} GiB")
    rows = []
    for length in args.lengths:
        for batch in args.batches:
            ids = torch.randint(1000, 100000, (batch, length), device="cuda")
            for label in args.caches:
                name, params = CACHES[label]
                cache = None
                try:
                    timed_generate(model, ids[:, :256], name, params, 4)  # warm-up
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    short = min(timed_generate(model, ids, name, params, 1)[0] for _ in range(args.repeats))
                    prefill_peak = torch.cuda.max_memory_allocated() - weights
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    long_s = float("inf")
                    for _ in range(args.repeats):  # one cache alive at a time, so the peak is one run's
                        seconds, cache = timed_generate(model, ids, name, params, args.new_tokens)
                        long_s, kv_bytes, cache = min(long_s, seconds), cache_nbytes(cache), None
                    peak = torch.cuda.max_memory_allocated() - weights
                    row = dict(cache=label, length=length, batch=batch,
                               ms_per_step=1000 * (long_s - short) / (args.new_tokens - 1),
                               prefill_s=short, prefill_peak_gib=prefill_peak / 2**30, peak_gib=peak / 2**30,
                               kv_gib=kv_bytes / 2**30)
                except Exception as err:  # report and go on: one failing cache must not cost the lease
                    row = dict(cache=label, length=length, batch=batch, error=repr(err)[:200])
                rows.append(row)
                print(json.dumps(row), flush=True)
                del cache
                torch.cuda.empty_cache()
    print("| cache | length | batch | ms/step | prefill s | KV GiB | prefill peak GiB | generate peak GiB |")
    for r in rows:
        if "error" in r:
            print(f"| {r['cache']} | {r['length']} | {r['batch']} | error: {r['error']} |")
        else:
            print(f"| {r['cache']} | {r['length']} | {r['batch']} | {r['ms_per_step']:.1f} | {r['prefill_s']:.2f} | "
                  f"{r['kv_gib']:.2f} | {r['prefill_peak_gib']:.2f} | {r['peak_gib']:.2f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
