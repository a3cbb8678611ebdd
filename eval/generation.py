"""Greedy `model.generate` through a cache on a left-padded batch, timing prefill and decode separately."""

from __future__ import annotations

import time

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from kvpress_lite import cache_kwarg, cache_nbytes


class StepClock(LogitsProcessor):
    """Timestamps every generation step (called once per forward, after the logits): step 0 ends the prefill.

    With a `cache`, also samples its resident bytes (`cache_nbytes`) after every forward; the time that takes is
    taken out of the timestamps, so throughput is unaffected.
    """

    def __init__(self, device: torch.device, cache=None):
        self.device, self.cache, self.times, self.sizes, self._spent = device, cache, [], [], 0.0

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times.append(now - self._spent)
        if self.cache is not None:
            self.sizes.append(cache_nbytes(self.cache))
            self._spent += time.perf_counter() - now
        return scores


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)`, both `[batch, max_len]`, padded on the left."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids, mask


@torch.no_grad()
def greedy_generate(model, tokenizer, sequences: list[list[int]], cache, max_new_tokens: int) -> dict:
    """Generate exactly `max_new_tokens` greedy tokens per row (EOS suppressed so every cache sees the same tokens).

    Returns:
        dict with `texts` (decoded new tokens), `prefill_s`, `decode_s`, `prefill_tokens` (batch x padded width),
        `decode_tokens` (batch x decode steps after the first token), `kv_bytes_max` (the cache's largest resident
        bytes after any forward, whole batch).
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, attention_mask = left_pad(sequences, pad_id)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
        pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
    )
    clock = StepClock(device, cache)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = model.generate(
        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config,
        logits_processor=LogitsProcessorList([clock]), **{cache_kwarg(model): cache},
    )
    new = out[:, input_ids.shape[1] :]
    return {
        "texts": tokenizer.batch_decode(new, skip_special_tokens=True),
        "prefill_s": clock.times[0] - start,
        "decode_s": clock.times[-1] - clock.times[0],
        "prefill_tokens": input_ids.numel(),
        "decode_tokens": input_ids.shape[0] * (len(clock.times) - 1),
        "kv_bytes_max": max(clock.sizes),
    }
