"""Which needle digits does each policy keep? Per full-attention layer, from the cache's own kept slots.

    PYTHONPATH=. python scripts/kept_digits.py recipes/leaderboard.yaml --cell niah_multikey-2048 \
        --labels snapkv-ratio0.25 expected_attention-ratio0.25 kvzip-ratio0.25 --samples 0 1 2 3 4

For each sample the harness generates for that cell (same seed, same prompt) and each cache label, it prefills the
prompt through the cache and decodes 2 tokens (so every policy has evicted: KVzip re-reads at the first decoding
step), then reports, per full-attention layer, the share of the queried value's tokens (the 7 digits) still in the
cache, per KV head. Unlike `eval.diagnose` it needs no reference score, so it covers every policy (Expected Attention
and KVzip included) and per-head budgets (`adaptive=True`). `--json` writes the rows.
"""

from __future__ import annotations

import argparse
import json

import torch


@torch.no_grad()
def kept_digits(recipe_path: str, cell: str, labels: list[str], samples: list[int]) -> list[dict]:
    from eval import zoo
    from eval.config import load_recipe
    from eval.diagnose import token_span
    from eval.execute import make_sample
    from eval.runs import plan
    from eval.tasks import Prompter
    from kvpress_lite import build_cache
    from kvpress_lite._compat import cache_kwarg
    from kvpress_lite.eviction import AdaptiveEvictionLayer, EvictionLayer

    recipe = load_recipe(recipe_path, [])
    runs = {r.cache.label: r for r in plan(recipe) if r.cell == cell}
    unknown = sorted(set(labels) - set(runs))
    if unknown:
        raise ValueError(f"labels {unknown} are not runs of cell {cell!r}; accepted: {sorted(runs)}")
    first = runs[labels[0]]
    model, tokenizer = zoo.load(first.model, first.dtype, recipe.device, recipe.attn_implementation)
    prompter = Prompter(tokenizer, recipe.chat)
    rows = []
    for index in samples:
        sample = make_sample(first, tokenizer, index)
        ids = torch.tensor([prompter.encode(sample.prompt)], device=model.device)
        value = sample.answer.split()[0]
        at = sample.prompt.index(sample.needle) + sample.needle.index(value)
        start, end = token_span(tokenizer, sample.prompt, at, len(value), not recipe.chat)
        for label in labels:
            run = runs[label]
            cache = build_cache(run.cache.strategy, model, **run.cache.params)
            try:
                model.generate(input_ids=ids, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                               pad_token_id=tokenizer.eos_token_id, **{cache_kwarg(model): cache})
                for i, layer in enumerate(cache.layers):
                    if isinstance(layer, AdaptiveEvictionLayer):
                        heads, pos = layer.heads[0].long(), layer.positions[0].long()
                        share = [((pos >= start) & (pos < end) & (heads == h)).sum().item() / (end - start)
                                 for h in range(layer.num_heads)]
                    elif isinstance(layer, EvictionLayer):
                        pos = layer.positions[0].long()  # (H, P)
                        share = (((pos >= start) & (pos < end)).sum(-1).float() / (end - start)).tolist()
                    else:
                        continue
                    rows.append({"sample": index, "depth": sample.depth, "label": label, "layer": i,
                                 "prompt_tokens": ids.shape[1], "value_tokens": [start, end],
                                 "value_kept_share_per_kv_head": share})
                    print(f"sample {index} depth {sample.depth} {label:32s} layer {i:2d}: value digits kept "
                          f"{', '.join(f'{s:.0%}' for s in share)} per KV head", flush=True)
            finally:
                cache.detach()
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--cell", required=True, help="e.g. niah_multikey-2048")
    parser.add_argument("--labels", nargs="+", required=True, help="cache labels, e.g. snapkv-ratio0.25")
    parser.add_argument("--samples", type=int, nargs="+", default=[0])
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = kept_digits(args.recipe, args.cell, args.labels, args.samples)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
