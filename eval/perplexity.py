"""Perplexity measured through the cache (docs/design/measuring.md).

A prefix is prefilled into the cache, then the evaluated tokens are fed through the cache in chunks
of `chunk_size` tokens, so every evaluated token attends to the compressed history. A single
full-sequence forward would never read the cache and would measure nothing.

The first evaluated token is always fed alone, as `generate`'s first decoding step: caches that size
themselves on the prompt (an eviction `ratio=`) see the prefix as the prompt, whatever `chunk_size`.
"""

from __future__ import annotations

import math
import time

import torch

from kvpress_lite import cache_kwarg, cache_nbytes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def perplexity_through_cache(model, input_ids: torch.Tensor, cache, prefix_length: int, chunk_size: int = 1,
                             progress=None) -> dict:
    """Perplexity of `input_ids[:, prefix_length:]` given the prefix, fed through `cache`.

    Args:
        model: a causal LM.
        input_ids: `[batch, seq]` token ids (no padding).
        cache: a fresh `transformers.Cache`; it is filled by this call.
        prefix_length: tokens prefilled before evaluation (>= 1).
        chunk_size: tokens per forward after the prefix (1 = token by token, the strictest); the first
            evaluated token goes alone (it ends the prompt, as in `generate`).
        progress: optional callable, given the number of tokens scored after each forward (a progress bar's update).
    Returns:
        dict with `perplexity`, `nll` (mean per token), `eval_tokens`, `kv_bytes` (after the last chunk),
        `kv_bytes_mean` and `kv_bytes_max` (over the states after each chunk: caches whose size oscillates, e.g.
        a residual window that fills and flushes, compare fairly by these), `prefill_tokens_per_s`,
        `decode_tokens_per_s` (forwards only; the byte counting is not timed).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    seq = input_ids.shape[1]
    if not 1 <= prefix_length < seq:
        raise ValueError(f"prefix_length={prefix_length} must be in [1, {seq - 1}] for a sequence of {seq} tokens")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    key = cache_kwarg(model)

    _sync(device)
    start = time.perf_counter()
    out = model(input_ids[:, :prefix_length], use_cache=True, **{key: cache})
    _sync(device)  # CUDA runs asynchronously: time the work, not the launch
    prefill_s = time.perf_counter() - start
    last_logits = out.logits[:, -1:]  # predicts token `prefix_length`
    nll_sum, count, decode_s, sizes = 0.0, 0, 0.0, []
    starts = [prefix_length, *range(prefix_length + 1, seq, chunk_size)]
    for begin, end in zip(starts, [*starts[1:], seq]):
        chunk = input_ids[:, begin:end]
        start = time.perf_counter()
        out = model(chunk, use_cache=True, **{key: cache})
        _sync(device)
        decode_s += time.perf_counter() - start
        sizes.append(cache_nbytes(cache))
        logits = torch.cat([last_logits, out.logits[:, :-1]], dim=1).float()  # predict chunk tokens
        nll_sum += torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk.flatten(), reduction="sum").item()
        count += chunk.numel()
        last_logits = out.logits[:, -1:]
        if progress is not None:
            progress(end - begin)
    nll = nll_sum / count
    return {
        "perplexity": math.exp(nll),
        "nll": nll,
        "eval_tokens": count,
        "kv_bytes": sizes[-1],
        "kv_bytes_mean": sum(sizes) / len(sizes),
        "kv_bytes_max": max(sizes),
        "prefill_tokens_per_s": input_ids.shape[0] * prefix_length / prefill_s,
        "decode_tokens_per_s": count / decode_s,
    }
