"""Checks that beam search and sampling through a lossy cache really used that cache (not shape checks).

A returned beam's score (`length_penalty=0`: the sum of its tokens' log-probabilities) must equal the log-probability
of the same tokens teacher-forced through a fresh cache of the same kind, row by row: a beam whose cache was not
reordered with it (or reordered twice) reads another beam's history and scores differently.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from kvpress_lite import cache_kwarg


class Force(LogitsProcessor):
    """Forces the tokens `tokens[:, step]` at every step."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens, self.step = tokens, 0

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced.scatter_(1, self.tokens[:, self.step : self.step + 1].to(scores.device), 0.0)
        self.step += 1
        return forced


def _run(model, cache, **kwargs):
    try:
        return model.generate(pad_token_id=0, return_dict_in_generate=True, **{cache_kwarg(model): cache}, **kwargs)
    finally:
        if hasattr(cache, "detach"):
            cache.detach()


def forced_logprob(model, cache, ids, mask, new) -> torch.Tensor:
    """`[batch]`: sum of log p(new[:, t] | prompt, new[:, :t]) through `cache`, fed as `generate` feeds it."""
    n = new.shape[1]
    out = _run(model, cache, input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
               logits_processor=[Force(new)], output_logits=True)
    assert torch.equal(out.sequences[:, ids.shape[1] :], new)
    logp = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # raw logits [batch, n, vocab]
    return logp.gather(-1, new[..., None]).squeeze(-1).sum(-1)


def assert_beams_match_teacher_forcing(model, make_cache, ids, mask, new_tokens=6, beams=3, atol=1e-3):
    """Beam search through `make_cache()`: every returned beam's score equals its teacher-forced log-probability."""
    out = _run(model, make_cache(), input_ids=ids, attention_mask=mask, num_beams=beams, num_return_sequences=beams,
               max_new_tokens=new_tokens, min_new_tokens=new_tokens, length_penalty=0.0, do_sample=False,
               output_scores=True)
    rows = ids.repeat_interleave(beams, 0)
    new = out.sequences[:, ids.shape[1] :]
    assert len({tuple(s.tolist()) for s in new}) > 1, "beams collapsed to one sequence: the check would be vacuous"
    forced = forced_logprob(model, make_cache(), rows, mask.repeat_interleave(beams, 0), new)
    torch.testing.assert_close(out.sequences_scores.float(), forced, atol=atol, rtol=0)
    return out.sequences


def assert_sampled_from_cache(model, make_cache, ids, mask, new_tokens=8, top_k=5, seed=0) -> torch.Tensor:
    """Top-k sampling through `make_cache()`: every sampled token is among the top k of the distribution teacher-forced
    through a fresh cache of the same kind (EOS excluded: `min_new_tokens` keeps it out). Returns the new tokens."""
    torch.manual_seed(seed)
    out = _run(model, make_cache(), input_ids=ids, attention_mask=mask, do_sample=True, top_k=top_k,
               max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    new = out.sequences[:, ids.shape[1] :]
    forced = _run(model, make_cache(), input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens, do_sample=False, logits_processor=[Force(new)], output_logits=True)
    logits = torch.stack(forced.logits, dim=1).float()  # [batch, new_tokens, vocab]
    eos = model.generation_config.eos_token_id
    logits[..., eos if eos is not None else []] = float("-inf")
    rank = (logits > logits.gather(-1, new[..., None])).sum(-1)
    assert rank.max() < top_k, rank
    return new
