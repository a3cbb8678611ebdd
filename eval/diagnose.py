"""Is a retrieval collapse the policy or a bug? Compare a policy's scores on a harness prompt with a reference
computed from eager attention weights, and see which tokens each would keep.

    python -m eval.diagnose recipes/eviction.yaml --cell niah_multikey-2048 --label h2o-ratio0.5 --samples 0 1 2

For the sample(s) the harness generated for that cell (same seed, same prompt), it:
1. runs the prompt once through the model with eager attention and `output_attentions=True` and computes, per
   full-attention layer and KV head, the score the policy is defined by (h2o: attention mass summed over every
   query and the query heads of the KV head, or its mean per query with `average`; tova: the last query's
   attention averaged over heads; snapkv: the last `window` queries, max-pooled with `kernel`);
2. prefills the same prompt into the policy's cache with a budget above the prompt (nothing evicted yet), once
   under eager and once under sdpa attention, and compares the cache's scores with that reference;
3. applies the cell's ratio to the reference scores (sinks and recent window protected, as the cache does) and
   reports, per full-attention layer, the share of the queried needle's tokens that the policy keeps after the
   prefill, beside what the harness generated.
Agreement in (2) says the implementation computes the policy; (3) then says whether the policy itself drops the
needle. Prints one line per sample and layer; `--json` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F


def reference_scores(attn: torch.Tensor, kv_heads: int, policy: str, params: dict) -> torch.Tensor:
    """`[kv_heads, L]` policy scores from eager attention weights `attn` `[H_q, L, L]` of one layer (batch 1)."""
    h_q, length, _ = attn.shape
    grouped = attn.float().reshape(kv_heads, h_q // kv_heads, length, length).sum(1)  # (Hkv, L_q, L_k)
    if policy == "h2o":
        mass = grouped.sum(1)  # (Hkv, L): summed over every query
        if params.get("average"):
            mass = mass / (length - torch.arange(length, dtype=torch.float32))  # queries that could see each token
        return mass
    if policy == "tova":
        return grouped[:, -1].mean(0, keepdim=True).expand(kv_heads, -1)
    if policy == "snapkv":
        window, kernel = params.get("window", 32), params.get("kernel", 7)
        mass = grouped[:, -window:].sum(1)
        return F.max_pool1d(mass[None], kernel, stride=1, padding=kernel // 2)[0]
    raise ValueError(f"policy={policy!r} has no attention reference; accepted values: ['h2o', 'snapkv', 'tova']")


def kept(scores: torch.Tensor, budget: int, sinks: int, recent: int) -> torch.Tensor:
    """`[kv_heads, L]` bool: the slots a cache keeps with these scores (sinks and recent window protected)."""
    length = scores.shape[-1]
    protected = scores.clone()
    protected[:, :sinks] = float("inf")
    protected[:, length - recent :] = float("inf")
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(1, protected.topk(min(budget, length), dim=-1).indices, True)
    return keep


def token_span(tokenizer, prompt: str, at: int, width: int, add_special_tokens: bool) -> tuple[int, int]:
    """Token index range `[start, end)` covering characters `[at, at + width)` of the encoded `prompt`."""
    enc = tokenizer(prompt, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    spans = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > at and a < at + width]
    return spans[0], spans[-1] + 1


@torch.no_grad()
def diagnose(recipe_path: str, cell: str, label: str, samples: list[int], overrides=()) -> list[dict]:
    from kvpress_lite import build_cache, cache_kwarg
    from kvpress_lite.cache import ModelGeometry

    from . import zoo
    from .config import load_recipe
    from .execute import make_sample
    from .runs import plan
    from .tasks import Prompter

    recipe = load_recipe(recipe_path, list(overrides))
    run = next((r for r in plan(recipe) if r.cell == cell and r.cache.label == label), None)
    if run is None:
        cells = sorted({f"{r.cell}/{r.cache.label}" for r in plan(recipe)})
        raise ValueError(f"no run {cell}/{label} in {recipe_path}; accepted: {cells}")
    policy, params = run.cache.strategy, dict(run.cache.params)
    model, tokenizer = zoo.load(run.model, run.dtype, recipe.device, "eager")
    geometry = ModelGeometry.of(model.config)
    full = [i for i, t in enumerate(geometry.layer_types) if t == "full_attention"]
    kv_heads = geometry.kv_heads
    prompter = Prompter(tokenizer, recipe.chat)
    ratio, sinks, recent = params.pop("ratio", None), params.pop("sinks", 4), params.pop("recent", 16)
    out = []
    for index in samples:
        sample = make_sample(run, tokenizer, index)
        ids = torch.tensor([prompter.encode(sample.prompt)], device=model.device)
        length = ids.shape[1]
        at = sample.prompt.index(sample.needle)  # the queried needle, and its value (the answer) inside it
        start, end = token_span(tokenizer, sample.prompt, at, len(sample.needle), not recipe.chat)
        value = sample.answer.split()[0]
        v_at = at + sample.needle.index(value)
        v_start, v_end = token_span(tokenizer, sample.prompt, v_at, len(value), not recipe.chat)
        attentions = model(ids, output_attentions=True).attentions
        budget = max(math.ceil(ratio * length), sinks + recent, 1) if ratio is not None else params["budget"]
        ours = {}
        for impl in ("eager", "sdpa"):
            model.set_attn_implementation(impl)
            cache = build_cache(policy, model, budget=length + 64, sinks=sinks, recent=recent,
                                **{k: v for k, v in params.items() if k != "budget"})
            model(ids, **{cache_kwarg(model): cache})
            ours[impl] = {i: cache.layers[i].scores[0].float() for i in full}
            cache.detach()
        model.set_attn_implementation("eager")
        for i in full:
            ref = reference_scores(attentions[i][0], kv_heads, policy, params)
            err = {impl: ((ours[impl][i] - ref).abs().max() / ref.abs().max()).item() for impl in ours}
            keep = kept(ref, budget, sinks, recent)
            share = keep[:, start:end].float().mean(1)  # per kv head
            value_share = keep[:, v_start:v_end].float().mean(1)
            rank = (ref[:, start:end].mean(1, keepdim=True) < ref).float().mean(1)  # share of tokens scored above
            row = {"sample": index, "depth": sample.depth, "layer": i, "prompt_tokens": length, "budget": budget,
                   "needle_tokens": [start, end], "rel_err_eager": err["eager"], "rel_err_sdpa": err["sdpa"],
                   "needle_kept_share_per_kv_head": share.tolist(), "needle_score_rank_per_kv_head": rank.tolist(),
                   "value_tokens": [v_start, v_end], "value_kept_share_per_kv_head": value_share.tolist()}
            out.append(row)
            print(f"sample {index} depth {sample.depth} layer {i}: scores vs eager reference max rel err "
                  f"{err['eager']:.1e} (eager) {err['sdpa']:.1e} (sdpa); needle tokens {start}-{end} of {length}, "
                  f"kept at budget {budget}: {', '.join(f'{s:.0%}' for s in share.tolist())} per KV head "
                  f"(its value's {v_end - v_start} tokens: {', '.join(f'{s:.0%}' for s in value_share.tolist())}); "
                  f"{', '.join(f'{r:.0%}' for r in rank.tolist())} of tokens score above the needle", flush=True)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.diagnose", description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--cell", required=True, help="e.g. niah_multikey-2048")
    parser.add_argument("--label", required=True, help="cache label, e.g. h2o-ratio0.5")
    parser.add_argument("--samples", type=int, nargs="+", default=[0])
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    torch.set_num_threads(1)
    rows = diagnose(args.recipe, args.cell, args.label, args.samples, args.overrides)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    sys.exit(main())
