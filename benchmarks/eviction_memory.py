"""Resident bytes of an H2O cache over a long generation vs DynamicCache, SmolLM2-135M on CPU.

1000-token prompt, 2000 generated tokens (greedy, forced to full length), budget 256. After every step the cache's
`cache_nbytes` (storage actually held: keys, values, positions, scores, pad counts) is recorded. DynamicCache's bytes
are measured, not computed: a real DynamicCache after a 1000-token and a 3000-token forward; DynamicCache stores
exactly one slot per token, so bytes at any L are interpolated linearly between the two (checked to be linear).

    python benchmarks/eviction_memory.py [--prompt 1000] [--new 2000] [--budget 256] [--every 200]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from kvpress_lite import EvictionCache, cache_kwarg, cache_nbytes, load_model

try:
    from eviction_speed import prompt_ids
except ImportError:  # run as a module from the repository root
    from benchmarks.eviction_speed import prompt_ids


class RecordBytes(StoppingCriteria):
    """After each decoding step: (logical length L, physical length P, cache_nbytes, metadata bytes)."""

    def __init__(self, cache: EvictionCache):
        self.cache, self.rows = cache, []

    def __call__(self, input_ids, scores, **kwargs):
        layer = self.cache.layers[0]
        self.rows.append((layer.get_seq_length(), layer.physical_length, cache_nbytes(self.cache),
                          self.cache.metadata_nbytes()))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@torch.no_grad()
def dynamic_nbytes(model, ids) -> int:
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, **{cache_kwarg(model): cache})
    return cache_nbytes(cache)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=1000)
    parser.add_argument("--new", type=int, default=2000)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--policy", default="h2o")
    parser.add_argument("--every", type=int, default=200, help="print one row every N steps")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model("smollm2-135m", dtype=torch.bfloat16)
    ids = prompt_ids(tokenizer, args.prompt + args.new)
    prompt = ids[:, : args.prompt]

    short, long = dynamic_nbytes(model, prompt), dynamic_nbytes(model, ids)
    per_token = (long - short) / args.new
    linear_error = abs(short - per_token * args.prompt) / short
    def dyn(L: int) -> float:
        return short + per_token * (L - args.prompt)

    cache = EvictionCache(model, policy=args.policy, budget=args.budget)
    recorder = RecordBytes(cache)
    start = time.perf_counter()
    model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new,
                   min_new_tokens=args.new, do_sample=False, stopping_criteria=StoppingCriteriaList([recorder]),
                   **{cache_kwarg(model): cache})
    seconds = time.perf_counter() - start
    cache.detach()

    print(f"SmolLM2-135M bf16 CPU, batch 1, prompt {args.prompt}, {args.new} new tokens, {args.policy} budget "
          f"{args.budget} (slack {cache.layers[0].slack}); generate took {seconds:.0f} s")
    print(f"DynamicCache measured: {short / 2**20:.2f} MiB at L={args.prompt}, {long / 2**20:.2f} MiB at "
          f"L={args.prompt + args.new} -> {per_token:.0f} B/token (linearity error {linear_error:.1e})")
    print(f"{'step':>5} {'L':>5} {'P':>4} {'cache MiB':>10} {'meta KiB':>9} {'Dynamic MiB':>12} "
          f"{'b/L*Dyn+meta MiB':>17} {'cache/(b/L*Dyn+meta)':>21}")
    for step, (L, P, nbytes, meta) in enumerate(recorder.rows, 1):
        if step == 1 or step % args.every == 0 or step == len(recorder.rows):
            share = args.budget / L * dyn(L) + meta
            print(f"{step:>5} {L:>5} {P:>4} {nbytes / 2**20:>10.3f} {meta / 2**10:>9.1f} {dyn(L) / 2**20:>12.2f} "
                  f"{share / 2**20:>17.3f} {nbytes / share:>21.3f}")
    sizes = [nbytes for _, _, nbytes, _ in recorder.rows]  # the prompt exceeds the budget: all rows are past it
    L, P, nbytes, meta = recorder.rows[-1]
    print(f"flatness after the budget is reached: max/min = {max(sizes) / min(sizes):.4f} "
          f"(min {min(sizes) / 2**20:.3f} MiB, max {max(sizes) / 2**20:.3f} MiB; target <= 1.05)")
    print(f"physical length stayed in [{min(r[1] for r in recorder.rows)}, {max(r[1] for r in recorder.rows)}]")
    print(f"at the end: cache {nbytes / 2**20:.3f} MiB = {nbytes / dyn(L):.4f} of DynamicCache at L={L}; "
          f"b/L = {args.budget / L:.4f}; metadata {meta / nbytes:.1%} of the cache; "
          f"cache / (b/L * Dynamic + metadata) = {nbytes / (args.budget / L * dyn(L) + meta):.3f} (target within 10%)")


if __name__ == "__main__":
    main()
