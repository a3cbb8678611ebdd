"""Decode step time of H2O eviction (ratio 0.5) vs DynamicCache at a 2k-token context, SmolLM2-135M on CPU.

Method (docs/design/measuring.md): same process, same prompt; each repeat prefills a fresh cache of each kind, then
decodes one token at a time alternating the two caches step by step (each step = forward + greedy pick), `--warmup`
untimed steps then `--steps` timed ones. Reported: median step time per kind over all timed steps, the ratio of the
medians and the median of the paired per-step ratios. Absolute CPU times are noisy on a shared machine; the ratio is
the result.

    python benchmarks/eviction_speed.py [--context 2048] [--ratio 0.5] [--steps 20] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from transformers import DynamicCache

from kvpress_lite import EvictionCache, cache_kwarg, load_model


def prompt_ids(tokenizer, n: int) -> torch.Tensor:
    """`[1, n]` token ids of real English text (Python's language reference, shipped with CPython)."""
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :n]
    assert ids.shape[1] == n, f"not enough text for {n} tokens"
    return ids


@torch.no_grad()
def paired_decode_times(model, caches: dict, ids, warmup: int, steps: int) -> dict[str, list[float]]:
    """Prefill `ids` into every cache, then decode one token at a time, alternating caches step by step (so both
    see the same machine load); return each cache's wall times (s) of the `steps` timed steps."""
    kwarg = cache_kwarg(model)
    tokens = {name: model(input_ids=ids, **{kwarg: c}).logits[:, -1:].argmax(-1) for name, c in caches.items()}
    times = {name: [] for name in caches}
    for i in range(warmup + steps):
        order = list(caches) if i % 2 == 0 else list(reversed(caches))
        for name in order:
            start = time.perf_counter()
            tokens[name] = model(input_ids=tokens[name], **{kwarg: caches[name]}).logits[:, -1:].argmax(-1)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=2048, help="prompt tokens before decoding")
    parser.add_argument("--ratio", type=float, default=0.5, help="H2O budget as a fraction of the prompt")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per repeat")
    parser.add_argument("--warmup", type=int, default=3, help="untimed decode steps before timing")
    parser.add_argument("--repeats", type=int, default=3, help="fresh prefills of both caches + paired timed steps")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m", dtype=getattr(torch, args.dtype))
    ids = prompt_ids(tokenizer, args.context)
    base, h2o = "DynamicCache", f"h2o ratio={args.ratio}"
    times, budgets = {base: [], h2o: []}, None
    for _ in range(args.repeats):
        caches = {base: DynamicCache(config=model.config), h2o: EvictionCache(model, policy="h2o", ratio=args.ratio)}
        for name, t in paired_decode_times(model, caches, ids, args.warmup, args.steps).items():
            times[name] += t
        layer = caches[h2o].layers[0]
        budgets = (layer.budget, layer.slack, layer.physical_length)
        caches[h2o].detach()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"SmolLM2-135M {args.dtype}, CPU threads={torch.get_num_threads()}, load avg {load:.1f}, batch 1, "
          f"context {args.context}, {args.repeats} repeats x {args.steps} steps (warm-up {args.warmup})")
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    for name, ms in medians.items():
        extra = "  (budget {}, slack {}, physical length at end {})".format(*budgets) if name == h2o else ""
        p10 = sorted(times[name])[len(times[name]) // 10] * 1e3
        print(f"  {name:<18} median {ms:7.1f} ms/step  [p10 {p10:.1f}]{extra}")
    paired = statistics.median(a / b for a, b in zip(times[h2o], times[base]))
    print(f"  ratio h2o / DynamicCache: of medians {medians[h2o] / medians[base]:.3f}, median of paired steps "
          f"{paired:.3f}  (target <= 1.3)")


if __name__ == "__main__":
    main()
