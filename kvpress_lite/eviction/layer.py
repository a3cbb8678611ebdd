"""One full-attention layer's evicting KV storage: top-k and gather for every policy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._compat import CacheLayerMixin
from ..attention_bridge import BridgedLayerMixin
from ..layer_state import BatchStateMixin
from ..storage import StorageSpec
from . import observe
from .policy import EvictionBudget, EvictionPolicy, ScoreInputs


def begin_update(layer, spec: EvictionBudget, key_states: torch.Tensor, value_states: torch.Tensor,
                 share: float = 1.0) -> None:
    """What every evicting layer's `update` does first: refuse a forward whose predecessor's attention was never
    observed, initialize on the first call, leave the prompt at the first single-token forward, and (re)resolve the
    budget, `share` x the cache's (PyramidKV layer shares; floored at sinks + recent), and the slack.

    A prompt fed in several forwards (`generate(prefill_chunk_size=...)`) gets the same final budget as one forward:
    ratio x (tokens so far), evicting chunk by chunk, so prefill memory stays bounded too."""
    if layer._pending:
        raise RuntimeError(
            f"{type(layer).__name__} {layer.layer_idx}: the previous forward's attention was not observed, so pads "
            "and scores are unknown: the cache was detached, the model's attn_implementation was changed after the "
            "cache was built, or the cache runs with another model. Build the EvictionCache with the model that "
            "runs it."
        )
    if not layer.is_initialized:
        layer.lazy_initialization(key_states, value_states)
    q = key_states.shape[-2]
    if q == 1:
        layer.in_prompt = False
    if spec.due(layer.budget, layer.in_prompt):
        budget, layer.slack = spec.resolve(layer.length + q)
        layer.budget = max(round(budget * share), spec.sinks + spec.recent, 1)  # share 1.0: `budget` itself


class EvictionLayer(BridgedLayerMixin, BatchStateMixin, CacheLayerMixin):
    """Keeps at most `budget + slack` tokens per sequence and kv head, evicting the lowest-scored ones.

    Storage: `store`, a `kvpress_lite.storage.KVStorage` of P physical slots `[B, H_kv, P, D]` (each head keeps its
    own tokens; full precision, or quantized with per-token keys when `storage.bits` is set), `positions`
    `[B, H_kv, P]` int32 (logical index of each slot, increasing along P), `scores` `[B, H_kv, P]` fp32 (state of
    attention-based policies, else None), `n_pad` `[B]` (left-pad tokens seen per row).

    Contract with transformers' masks (docs/design/eviction.md): `get_seq_length()` is the logical length L,
    `update` returns the P_prev + q stored keys and `get_mask_sizes(q)` is `(P_prev + q, L_prev - P_prev)`. Padding is
    read from `attention_mask[:, kv_offset + j]`: pads are evicted first and kept slots stay in position order, so in
    every row (and head) the kept pads are the first slots and the mask's first columns past `kv_offset` are pads in
    the same number; kept keys stay at their original rotation.

    Prompt: the forwards before the first single-token one (one forward, or several under chunked prefill). A `ratio`
    budget is `ratio x` the prompt's length, re-resolved after each prompt chunk; decoding forwards keep it fixed.

    Timing: a forward's new keys are appended in `update` (the full P_prev + q keys are the transient attention reads);
    right after that layer's attention, `observe` updates scores and, when P exceeds `budget + slack`, gathers the
    top `budget` slots into new compact tensors. A prompt longer than the budget is thus evicted during prefill.

    Args:
        policy: the `EvictionPolicy` ranking slots.
        budget: an `EvictionBudget` (budget or ratio, sinks, recent, slack).
        layer_idx: the model layer this cache layer serves (matched against the attention module).
        storage: a `StorageSpec` (None: full precision).
    """

    is_sliding = False
    is_croppable = False
    is_compileable = False
    state_names = ("store", "positions", "scores", "n_pad", "queries")

    def __init__(self, policy: EvictionPolicy, budget: EvictionBudget, layer_idx: int = 0,
                 storage: StorageSpec | None = None):
        super().__init__()
        self.policy, self.spec, self.layer_idx = policy, budget, layer_idx
        self.storage = storage or StorageSpec()
        self.budget = self.slack = None
        self._clear()

    def _clear(self) -> None:
        self.store = self.storage.new()
        self.positions = self.scores = self.n_pad = None
        self.queries = None  # [B, H_q, <= policy.query_window, D] latest rotated queries (policies that read them)
        self._read = None  # the keys/values the pending attention reads, until it is observed
        self.length = 0
        self.in_prompt = True  # no single-token (decoding) forward yet: a ratio budget follows the prompt's length
        self._fused = False  # this forward's attention runs the kernel over the packed store (see observe.fuses)
        self.reset_bridge()
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H = key_states.shape[:2]
        self.device, self.dtype = key_states.device, key_states.dtype
        self.positions = torch.empty((B, H, 0), dtype=torch.int32, device=self.device)
        self.n_pad = torch.zeros(B, dtype=torch.long, device=self.device)
        if self.policy.uses_attention:
            self.scores = torch.empty((B, H, 0), dtype=torch.float32, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append `[B, H_kv, q, D]` states; return the `[B, H_kv, P_prev + q, D]` keys/values attention reads."""
        begin_update(self, self.spec, key_states, value_states)
        B, H, q, _ = key_states.shape
        self.store.append(key_states, value_states)
        if q == 1:  # a decode step: one kernel each (no arange, no zeros, no cat)
            self.positions = F.pad(self.positions, (0, 1), value=self.length)
        else:
            new_positions = torch.arange(self.length, self.length + q, dtype=torch.int32, device=self.device)
            self.positions = torch.cat([self.positions, new_positions.expand(B, H, q)], dim=-1)
        if self.scores is not None:
            self.scores = F.pad(self.scores, (0, q))  # the new slots score 0 until observed
        self.length += q
        self._fused = observe.fuses(self, q)  # attention runs the kernel over the packed store: no dequantized copy
        self._read = None if self._fused else self.store.read()
        returned = (self.store.keys, self.store.values) if self._fused else self._read
        self.expect_attention(returned[0])
        return returned

    def bridged_attention(self, base, module, query, key, value, attention_mask, **kwargs):
        """Attention, then `observe` (called by the bridge; see `observe.attend`)."""
        return observe.attend(self, base, module, query, key, value, attention_mask, **kwargs)

    def observe(self, query, key, attention_mask=None, weights=None, scaling=None, softcap=None, mass=None) -> None:
        """After attention: learn new pads from the mask, update scores, evict if over budget.

        Args:
            query: `[B, H_q, q, D]` this forward's rotated queries.
            key: `[B, H_kv, P, D]` the keys `update` returned (what attention read).
            attention_mask: the 4D mask attention used (bool or additive) or None.
            weights: eager attention's probabilities `[B, H_q, q, P]`, or None (sdpa).
            mass: the attention mass `[B, H_kv, P]` fp32 if the attention already summed it (the decode kernel's
                probabilities), else None (computed here from `weights` or the queries).
        """
        self._pending = False
        keys, values = self._read or (None, None)  # None after a fused forward (only policies without attention)
        self._read = None
        q, P = query.shape[-2], self.store.length
        # A decode step's token is real (generate never feeds pads after the prompt): no pads to learn, 4 fewer
        # kernel launches per layer and step on a host-bound GPU step.
        is_real = None if (q == 1 and not self.in_prompt) else observe.real_keys(attention_mask)  # [B, P] or None
        query_real = None
        if is_real is not None:
            query_real = is_real[:, P - q :]
            self.n_pad = self.n_pad + (~query_real).sum(dim=-1)
        if self.policy.uses_attention:
            if mass is None:
                mass = observe.attention_mass(
                    query, key, attention_mask, weights, scaling, softcap, self.policy.attention_window, query_real,
                    self.policy.attention_reduce,
                )
            inputs = ScoreInputs(keys, values, self.positions, mass, self.scores, self.length, q)
            self.scores = self.policy.score(inputs)
        if self.policy.query_window:
            self.queries = observe.recent_queries(self.queries, query, self.policy.query_window)
        deferred = self.in_prompt and self.policy.rereads  # KVzip: the prompt stays whole until re-read
        if P > self.budget + self.slack and not deferred:
            self.evict(self.budget, keys, values)
            self.queries = None  # scored: the next eviction reads the queries seen since (bounded metadata)
        self.store.flush()

    def protected_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """`scores` with pads at -inf (evicted first) and sinks / recent tokens at +inf (never evicted)."""
        return self.spec.protect(scores, self.positions, self.n_pad[:, None, None], self.length)

    def evict(self, budget: int, keys: torch.Tensor | None = None, values: torch.Tensor | None = None) -> None:
        """Keep the `budget` best slots per row and head, in position order, in new compact tensors.

        `keys`/`values` `[B, H_kv, P, D]`: the full-precision slots if already read (else read from the store)."""
        scores = self.scores
        if scores is None:
            if keys is None:
                keys, values = self.store.read()
            scores = self.policy.score(ScoreInputs(keys, values, self.positions, length=self.length,
                                                   queries=self.queries))
        keep = self.protected_scores(scores).topk(budget, dim=-1, sorted=False).indices.sort(dim=-1).values
        self.store.keep(keep)  # (B, Hkv, budget); new compact storage, the old buffers are freed
        self.positions = self.positions.gather(2, keep)
        if self.scores is not None:
            self.scores = self.scores.gather(2, keep)

    @property
    def physical_length(self) -> int:
        """Slots stored per row and head (P)."""
        return self.store.length

    def metadata_nbytes(self) -> int:
        """Bytes of bookkeeping (positions, scores, pad counts) on top of keys and values."""
        state = (self.positions, self.scores, self.n_pad, self.queries)
        return sum(t.untyped_storage().nbytes() for t in state if t is not None)

    def get_seq_length(self) -> int:
        """Logical length L: tokens seen, evicted ones included (queries' positions and masks depend on it)."""
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """`(P_prev + q, L_prev - P_prev)`: keys attention will read, and the mask column of the first one."""
        P = self.physical_length
        return P + query_length, self.length - P

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        """Drop all state; a ratio budget is resolved again on the next prompt."""
        self._clear()
        self.budget = self.slack = None

    def crop(self, tokens_to_remove: int) -> None:
        """Only `crop(0)` is possible: evicted tokens cannot be restored."""
        if tokens_to_remove != 0 and self.is_initialized:
            raise ValueError(f"crop({tokens_to_remove}) is not supported by an evicting cache (is_croppable=False)")
