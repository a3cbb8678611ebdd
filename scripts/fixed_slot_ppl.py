"""Perplexity through one cache, fixed_slot.yaml's protocol (SmolLM2 bf16, pydoc window 0, 512 + 1536 tokens, token by
token), for separating causes of a fixed-slot vs EvictionCache gap without a recipe run.

    OMP_NUM_THREADS=1 python scripts/fixed_slot_ppl.py '{"strategy": "h2o", "ratio": 0.25, "slack": 0}' [--eval 1536]
Prints one JSON line: the spec, perplexity, nll, kv_bytes_mean.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval import zoo  # noqa: E402
from eval.execute import _text_ids  # noqa: E402
from eval.perplexity import perplexity_through_cache  # noqa: E402
from kvpress_lite.registry import build_cache  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("specs", nargs="+", help='JSON cache specs: {"strategy": ..., **params}')
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prefix", type=int, default=512)
    parser.add_argument("--eval", type=int, default=1536)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = zoo.load(args.model, args.dtype)
    ids = _text_ids("pydoc", tokenizer)[: args.prefix + args.eval][None]
    for text in args.specs:
        spec = json.loads(text)
        params = dict(spec)
        cache = build_cache(params.pop("strategy"), model, **params)
        start = time.perf_counter()
        result = perplexity_through_cache(model, ids, cache, args.prefix, 1)
        if hasattr(cache, "detach"):
            cache.detach()
        print(json.dumps({"spec": spec, "eval": args.eval, "perplexity": round(result["perplexity"], 4),
                          "nll": round(result["nll"], 5), "kv_bytes_mean": result["kv_bytes_mean"],
                          "seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
