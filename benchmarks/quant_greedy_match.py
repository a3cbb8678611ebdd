"""Greedy generations of QuantizedKVCache int8 vs DynamicCache on SmolLM2, next to the numeric noise floor.

For each of N real-text prompts (~370 tokens of pydoc prose), generate 64 greedy tokens with
DynamicCache and with int8 (G=64, R=32, so most of the prompt is quantized) and report whether
they are identical and where they first diverge. The noise floor is eager vs SDPA attention with
DynamicCache: the same model, no compression.

    python benchmarks/quant_greedy_match.py --dtype float32 --prompts 10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # eval/ lives in the checkout, not in the wheel
from eval.text_sources import pydoc_text  # noqa: E402
from kvpress_lite import QuantizedKVCache, cache_kwarg, load_model  # noqa: E402


def first_divergence(a: torch.Tensor, b: torch.Tensor) -> int:
    same = (a == b).int()
    return len(same) if bool(same.all()) else int(same.argmin())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    sdpa, tok = load_model("smollm2-135m", dtype=dtype)
    eager, _ = load_model("smollm2-135m", dtype=dtype, attn_implementation="eager")
    text = pydoc_text()
    prompts = [text[20000 + 3000 * i : 20000 + 3000 * i + 1500] + "\n\nIn summary," for i in range(args.prompts)]
    rows = []
    for prompt in prompts:
        inputs = tok(prompt, return_tensors="pt")
        n = inputs["input_ids"].shape[1]
        gen = dict(max_new_tokens=args.new_tokens, do_sample=False)
        ref = sdpa.generate(**inputs, **gen)[0, n:]
        int8 = sdpa.generate(**inputs, **gen, **{cache_kwarg(sdpa): QuantizedKVCache(sdpa.config, 8, 64, 32)})[0, n:]
        floor = eager.generate(**inputs, **gen)[0, n:]
        rows.append((n, first_divergence(int8, ref), first_divergence(floor, ref)))
    print(f"SmolLM2-135M {args.dtype}, {args.new_tokens} greedy tokens, int8 G=64 R=32")
    print("| prompt tokens | int8 first divergence | eager-vs-sdpa first divergence |")
    for n, q, f in rows:
        print(f"| {n} | {q} | {f} |")
    full = args.new_tokens
    print(f"int8 identical: {sum(q == full for _, q, _ in rows)}/{len(rows)}; "
          f"eager-vs-sdpa identical: {sum(f == full for _, _, f in rows)}/{len(rows)}")


if __name__ == "__main__":
    main()
