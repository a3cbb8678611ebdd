"""KVzip-style query-agnostic eviction: the model re-reads its context, and each cached token is scored by the largest
attention it receives from that re-read."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .policy import EvictionPolicy, ScoreInputs
from .registration import register_policy


@register_policy("kvzip", "KVzip-style: largest attention from a re-read of the context (one extra pass)")
@dataclass
class KVzipPolicy(EvictionPolicy):
    """KVzip, Kim et al. 2025, https://arxiv.org/abs/2505.23416 (query-agnostic KV eviction by context reconstruction).

    After the prompt, the cache runs the model once more over the prompt's tokens, in chunks of `chunk_size`, each
    chunk attending to the whole cached prompt and to itself (a "repeat the previous context" pass, without the
    paper's textual instruction: a cache has no tokenizer, and the repeated tokens themselves put the model in copy
    mode). A cached token's score is the largest softmax probability any re-read query and any query head of its kv
    head gives it. The prompt is kept whole until then (`rereads`), so prefill memory is DynamicCache's; the re-read's
    own keys are never stored. Afterwards, tokens decoded later are scored by the largest attention a decoding query
    gives them (the same criterion, from real queries), so decoding evictions compare like with like.

    How it reaches the cache: `EvictionCache` registers a forward pre-hook on the model (`reread.RereadHook`, removed by
    `detach()` / `with`): at the first forward after the prompt (one token: generation's first decoding step, or
    perplexity's first scored token), it runs the re-read with a transient reader cache, then evicts every layer to
    its budget. Cost: one extra forward over the prompt (chunked; each chunk of c tokens attends to L + c keys), plus
    the attention probabilities of the full-attention layers recomputed for the scores under sdpa; on CPU about one
    more prefill. Needs the prompt as `input_ids` (not `inputs_embeds`).

    Args:
        chunk_size: re-read tokens per forward (paper: 2k for 8B models; bounds the `[q, L]` score transient).
        layerwise: False (default, the paper's non-uniform budgets): one ranking of all layers' (and KV heads')
            re-read scores for the same total (`reread.layer_budgets`), so a layer whose re-read attention is diffuse
            (low maxima) gives its slots to layers whose copy attention is sharp; the budgets set at the re-read hold
            for the rest of generation. True: every layer keeps its own budget (ratio x prompt) of its top scores
            (this policy's only behaviour before; on Gemma-3-270M it loses the needle at ratio 0.5, see
            docs/eviction-leaderboard.md).
    """

    chunk_size: int = 512
    layerwise: bool = False

    uses_attention = True
    attention_window = 1  # the prompt's scores come from the re-read; decoding forwards have one query
    attention_reduce = "max"
    rereads = True

    def __post_init__(self):
        if not isinstance(self.chunk_size, int) or isinstance(self.chunk_size, bool) or self.chunk_size < 1:
            raise ValueError(f"chunk_size={self.chunk_size!r} must be an integer >= 1 (re-read tokens per forward)")
        if not isinstance(self.layerwise, bool):
            raise ValueError(f"layerwise={self.layerwise!r} must be True (a budget per layer) or False (one ranking)")

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """`[batch, kv_heads, seq]`: the largest attention each slot has received (`max(previous, attention)`)."""
        return torch.maximum(inputs.previous, inputs.attention)
