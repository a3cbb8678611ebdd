"""Perplexity through the cache and resident KV bytes for the quantized caches vs transformers' QuantizedCache.

SmolLM2-135M, pydoc text, prefix 512 tokens prefilled, next 1536 tokens fed one at a time
(chunk_size 1), so every scored token reads the compressed cache. Same numbers as
`python -m eval recipes/quantization.yaml`; this script is the standalone version.

    python benchmarks/quant_perplexity.py --dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # eval/ lives in the checkout, not in the wheel
from eval.perplexity import perplexity_through_cache  # noqa: E402
from eval.text_sources import pydoc_text  # noqa: E402
from kvpress_lite import build_cache, load_model  # noqa: E402

SWEEP = [
    ("dynamic", "dynamic", {}),
    ("kvpress_lite int8", "quantized", {"bits": 8}),
    ("kvpress_lite int4", "quantized", {"bits": 4}),
    ("kvpress_lite int4 R=32", "quantized", {"bits": 4, "residual_length": 32}),
    ("kvpress_lite int4 R=0", "quantized", {"bits": 4, "residual_length": 0}),
    ("kvpress_lite int2", "quantized", {"bits": 2}),
    ("transformers QuantizedCache quanto int4", "hf-quantized", {"backend": "quanto", "bits": 4}),
    ("transformers QuantizedCache quanto int2", "hf-quantized", {"backend": "quanto", "bits": 2}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--prefix", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=1536)
    parser.add_argument("--chunk-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 avoids oversubscription)")
    parser.add_argument("--only", nargs="*", default=None, help="labels to run besides dynamic")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m", dtype=getattr(torch, args.dtype))
    ids = tok(pydoc_text()[:60000], return_tensors="pt").input_ids[:, : args.prefix + args.eval_tokens]
    print(f"SmolLM2-135M {args.dtype}, prefix {args.prefix}, {ids.shape[1] - args.prefix} tokens, "
          f"chunk {args.chunk_size}; vs dynamic = bytes / DynamicCache's bytes, change = ppl / DynamicCache's - 1")
    print("| cache | KV bytes at end | vs dynamic | mean KV bytes | max KV bytes | perplexity | change "
          "| decode tok/s |")
    base = None
    for label, name, params in SWEEP:
        if args.only is not None and name != "dynamic" and label not in args.only:
            continue
        r = perplexity_through_cache(model, ids, build_cache(name, model, **params), args.prefix, args.chunk_size)
        base = base or r
        change = 100 * (r["perplexity"] / base["perplexity"] - 1)
        print(f"| {label} | {r['kv_bytes']:,} | {r['kv_bytes'] / base['kv_bytes']:.3f} | {r['kv_bytes_mean']:,.0f} | "
              f"{r['kv_bytes_max']:,} | {r['perplexity']:.4f} | {change:+.2f}% | {r['decode_tokens_per_s']:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
