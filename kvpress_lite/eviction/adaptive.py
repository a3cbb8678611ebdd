"""Per-head budgets that free memory (AdaKV): one budget per layer, spread over its kv heads by score."""

from __future__ import annotations

import math

import torch

from .. import attention_bridge
from .._compat import CacheLayerMixin, attention_base_of
from ..layer_state import BatchStateMixin
from ..storage import StorageSpec
from . import observe
from .layer import begin_update
from .policy import EvictionBudget, EvictionPolicy, ScoreInputs


def check_adaptive(policy: EvictionPolicy, head_floor: float, storage: StorageSpec) -> None:
    """Raise a ValueError if `policy`, `head_floor` or `storage` cannot run with per-head budgets."""
    if not policy.per_head:
        raise ValueError(
            f"adaptive=True needs a policy whose scores rank tokens comparably across kv heads; policy={policy.name!r} "
            "does not (streaming ranks by position, random by chance, tova shares one ranking across heads). "
            "Accepted: a policy with per_head=True, e.g. 'snapkv', 'h2o', 'knorm', 'expected_attention'"
        )
    if policy.rereads:
        raise ValueError(
            f"adaptive=True does not support policy={policy.name!r} yet (its re-read pass scores the uniform layers); "
            "accepted: a policy without a re-read, e.g. 'snapkv', 'h2o', 'knorm', 'expected_attention'"
        )
    if isinstance(head_floor, bool) or not isinstance(head_floor, (int, float)) or not 0 <= head_floor <= 1:
        raise ValueError(
            f"head_floor={head_floor!r} must be a number in [0, 1]: the fraction of the per-head budget every kv head "
            "keeps at least (AdaKV's safeguard, 0.2); a floor above the budget is impossible"
        )
    if storage.quantized and storage.key_mode != "token":
        raise ValueError(
            f"key_mode={storage.key_mode!r} is not supported with adaptive=True (the slot pool mixes heads, so keys "
            "are quantized per token); accepted values: ['token']"
        )


class AdaptiveEvictionLayer(BatchStateMixin, CacheLayerMixin):
    """Evicting layer with per-head budgets (AdaKV, Feng et al. 2024, https://arxiv.org/abs/2407.11550).

    A row keeps `budget x H_kv` slots in all, spread over its kv heads by top-k over the flattened heads' scores, each
    head keeping at least `ceil(head_floor x budget)`. Storage is a flat slot pool per row, so resident bytes follow
    the sum of the kept slots, never the longest head times the head count: `store`, a `storage.KVStorage` of
    `[B, 1, S, D]` slots (full precision, or per-token quantized codes that eviction gathers), `heads` `[B, S]` int16
    (the slot's kv head), `positions` `[B, S]` int32 (its logical index), `scores` `[B, S]` fp32 (attention-based
    policies), `n_pad` `[B]`, `queries` (policies with a query window). Every row holds the same S (the same total),
    so rows need no padding; beam reorder and batch select map every state tensor along batch.

    Attention (masked path): the layer attends through the bridge itself: it groups the pool by head into a transient
    `[B, H_kv, P_max, D]` view (sorted by position, P_max the longest head), builds the mask from the slots' positions,
    the row's pads and causality, and runs the model's own attention (sdpa or eager) on it. transformers' mask is read
    only for the new tokens' padding: `get_mask_sizes(q)` is `(q, L_prev)`, the same for every adaptive layer.

    Timing and budget: as `EvictionLayer` (a ratio budget follows the prompt; a gather when the pool exceeds
    `(budget + slack) x H_kv` slots per row).

    Args:
        policy: an `EvictionPolicy` with `per_head = True`.
        budget: an `EvictionBudget`; its budget (or ratio) is per kv head on average.
        layer_idx: the model layer this cache layer serves.
        storage: a `StorageSpec` (None: full precision; quantized needs `key_mode="token"`).
        head_floor: fraction in [0, 1] of the per-head budget each head keeps at least (AdaKV: 0.2).
        layer_share: this layer's budget as a multiple of the cache's (`pyramid_shares`; 1.0: uniform over layers).
    """

    is_sliding = False
    is_croppable = False
    is_compileable = False
    state_names = ("store", "heads", "positions", "scores", "n_pad", "queries")

    def __init__(self, policy: EvictionPolicy, budget: EvictionBudget, layer_idx: int = 0,
                 storage: StorageSpec | None = None, head_floor: float = 0.2, layer_share: float = 1.0):
        super().__init__()
        self.storage = storage or StorageSpec()
        check_adaptive(policy, head_floor, self.storage)
        self.policy, self.budget_spec, self.layer_idx, self.head_floor = policy, budget, layer_idx, head_floor
        self.layer_share = layer_share
        self.budget = self.slack = None
        self._clear()

    def _clear(self) -> None:
        self.store = self.storage.new()
        self.heads = self.positions = self.scores = self.n_pad = self.queries = None
        self.length = 0
        self.in_prompt = True
        self._pending = False
        self.is_initialized = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, self.num_heads = key_states.shape[:2]
        self.device, self.dtype = key_states.device, key_states.dtype
        self.heads = torch.empty((B, 0), dtype=torch.int16, device=self.device)
        self.positions = torch.empty((B, 0), dtype=torch.int32, device=self.device)
        self.n_pad = torch.zeros(B, dtype=torch.long, device=self.device)
        if self.policy.uses_attention:
            self.scores = torch.empty((B, 0), dtype=torch.float32, device=self.device)
        self.is_initialized = True

    # ------------------------------------------------------------------ cache contract
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append `[B, H_kv, q, D]` states to the pool; return them (attention runs in `attend`, over the pool)."""
        begin_update(self, self.budget_spec, key_states, value_states, self.layer_share)  # PyramidKV: layer's share
        B, H, q, D = key_states.shape
        self.store.append(key_states.reshape(B, 1, H * q, D), value_states.reshape(B, 1, H * q, D))  # head-major
        new_heads = torch.arange(H, dtype=torch.int16, device=self.device).repeat_interleave(q)
        new_positions = torch.arange(self.length, self.length + q, dtype=torch.int32, device=self.device).repeat(H)
        self.heads = torch.cat([self.heads, new_heads.expand(B, -1)], dim=1)
        self.positions = torch.cat([self.positions, new_positions.expand(B, -1)], dim=1)
        if self.scores is not None:
            self.scores = torch.cat([self.scores, self.scores.new_zeros(B, H * q)], dim=1)
        self.length += q
        self._pending = True
        attention_bridge.expect(self, key_states)
        return key_states, value_states

    def get_seq_length(self) -> int:
        """Logical length L (tokens seen, evicted ones included)."""
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """`(q, L_prev)`: transformers' mask covers only the new tokens (their padding); `attend` masks the pool."""
        return query_length, self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()
        self.budget = self.slack = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0 and self.is_initialized:
            raise ValueError(f"crop({tokens_to_remove}) is not supported by an evicting cache (is_croppable=False)")

    # ------------------------------------------------------------------ per-head view of the pool
    def head_view(self):
        """Group the pool by head: `(index [B, H, P_max] into the pool, valid [B, H, P_max] bool)`, slots of each
        head in position order (padding entries point at slot 0 and are invalid)."""
        B, S = self.positions.shape
        H = self.num_heads
        order = (self.heads.long() * (self.length + 1) + self.positions.long()).argsort(dim=1)  # (B, S) head-major
        counts = torch.stack([(self.heads == h).sum(1) for h in range(H)], dim=1)  # (B, H)
        p_max = int(counts.max()) if S else 0
        starts = counts.cumsum(1) - counts  # (B, H) first sorted slot of each head
        j = torch.arange(p_max, device=self.device)
        valid = j[None, None, :] < counts[:, :, None]  # (B, H, P_max)
        sorted_at = (starts[:, :, None] + j).clamp(max=max(S - 1, 0)).view(B, -1)
        index = order.gather(1, sorted_at).view(B, H, p_max).masked_fill(~valid, 0)
        return index, valid

    @staticmethod
    def _gather(pool: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """`[B, 1, S, D]` pool -> `[B, H, P_max, D]` per-head view at `index` `[B, H, P_max]`."""
        B, H, P = index.shape
        flat = pool[:, 0].gather(1, index.view(B, H * P, 1).expand(-1, -1, pool.shape[-1]))
        return flat.view(B, H, P, -1)

    # ------------------------------------------------------------------ attention (called by the bridge)
    def attend(self, base, module, query, key, value, attention_mask, **kwargs):
        """Attention of `query` `[B, H_q, q, D]` over the pool, masked per (row, head); then scores and eviction."""
        self._pending = False
        q = query.shape[-2]
        query_real = None
        is_real = observe.real_keys(attention_mask)  # (B, q): transformers' mask covers the new tokens only
        if is_real is not None:
            query_real = is_real[:, -q:]
            self.n_pad = self.n_pad + (~query_real).sum(dim=-1)
        index, valid = self.head_view()
        keys_all, values_all = self.store.read()
        keys, values = self._gather(keys_all, index), self._gather(values_all, index)  # (B, H, P_max, D)
        pos = self.positions.long().gather(1, index.view(index.shape[0], -1)).view(index.shape)
        query_pos = torch.arange(self.length - q, self.length, device=self.device)  # (q,)
        allowed = (valid & (pos >= self.n_pad[:, None, None]))[:, :, None, :] & (
            pos[:, :, None, :] <= query_pos[None, None, :, None])  # (B, H, q, P_max)
        own = pos[:, :, None, :] == query_pos[None, None, :, None]  # a pad query sees itself only (no empty row)
        allowed = allowed | (own & ~allowed.any(-1, keepdim=True))
        G = query.shape[1] // self.num_heads
        mask = allowed.repeat_interleave(G, dim=1)  # (B, H_q, q, P_max)
        if attention_base_of(module) == "eager":
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=self.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min)
        output, weights = base(module, query, keys, values, mask, **kwargs)
        self._observe(query, keys, values, index, valid, allowed, weights, query_real, kwargs)
        return output, weights

    def _observe(self, query, keys, values, index, valid, allowed, weights, query_real, kwargs) -> None:
        """Update scores from this forward's attention (per head view, scattered back) and evict if over budget."""
        H = self.num_heads
        view_positions = self.positions.gather(1, index.view(index.shape[0], -1)).view(index.shape)
        if self.policy.uses_attention:
            mass = observe.attention_mass(query, keys, allowed, weights, kwargs.get("scaling"), kwargs.get("softcap"),
                                          self.policy.attention_window, query_real)  # (B, H, P_max)
            previous = self.scores.gather(1, index.view(index.shape[0], -1)).view(index.shape)
            inputs = ScoreInputs(keys, values, view_positions, mass, previous, self.length, query.shape[-2],
                                 valid=valid)
            self._scatter_scores(self.policy.score(inputs), index, valid)
        if self.policy.query_window:
            self.queries = observe.recent_queries(self.queries, query, self.policy.query_window)
        if self.positions.shape[1] > (self.budget + self.slack) * H:
            if self.scores is None:
                inputs = ScoreInputs(keys, values, view_positions, length=self.length, queries=self.queries,
                                     valid=valid)
                self._scatter_scores(self.policy.score(inputs), index, valid)
            self.evict(index, valid)
            self.queries = None  # scored: the next eviction reads the queries seen since (bounded metadata)
            if not self.policy.uses_attention:
                self.scores = None
        self.store.flush()

    def _scatter_scores(self, view_scores: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> None:
        """Write per-head view scores `[B, H, P_max]` back to the pool's slots (`scores` `[B, S]`)."""
        B, S = self.positions.shape
        flat = view_scores.float().masked_fill(~valid, float("-inf")).reshape(B, -1)
        target = index.reshape(B, -1).masked_fill(~valid.reshape(B, -1), S)  # invalid entries -> a dropped column
        scores = torch.full((B, S + 1), float("-inf"), device=self.device)
        self.scores = scores.scatter(1, target, flat)[:, :S].contiguous()

    def protected_scores(self) -> torch.Tensor:
        """Pool scores `[B, S]` with pads at -inf and sinks / recent tokens at +inf."""
        return self.budget_spec.protect(self.scores, self.positions, self.n_pad[:, None], self.length)

    def evict(self, index: torch.Tensor, valid: torch.Tensor) -> None:
        """Keep `budget x H_kv` slots per row: each head's `ceil(head_floor x budget)` best, then the best of the rest
        over all heads; gathered into new compact tensors in pool order."""
        B, S = self.positions.shape
        total = self.budget * self.num_heads
        scores = self.protected_scores()
        floor = min(math.ceil(self.head_floor * self.budget), self.budget)
        if floor:
            view = scores.gather(1, index.view(B, -1)).view(index.shape).masked_fill(~valid, float("-inf"))
            best = view.topk(min(floor, view.shape[-1]), dim=-1).indices  # (B, H, floor) per-head best
            chosen = index.gather(2, best).view(B, -1)
            chosen_valid = valid.gather(2, best).view(B, -1)
            floored = torch.zeros(B, S + 1, dtype=torch.bool, device=self.device)
            floored.scatter_(1, chosen.masked_fill(~chosen_valid, S), True)
            scores = scores.masked_fill(floored[:, :S], float("inf"))
        keep = scores.topk(min(total, S), dim=-1, sorted=False).indices.sort(dim=-1).values  # (B, K) pool order
        self.store.keep(keep[:, None, :])
        self.heads = self.heads.gather(1, keep)
        self.positions = self.positions.gather(1, keep)
        self.scores = self.scores.gather(1, keep)

    # ------------------------------------------------------------------ bookkeeping
    @property
    def physical_length(self) -> int:
        """Slots stored per row, all heads together (S)."""
        return 0 if self.positions is None else self.positions.shape[1]

    def head_lengths(self) -> torch.Tensor:
        """`[B, H_kv]` slots kept per row and head."""
        return torch.stack([(self.heads == h).sum(1) for h in range(self.num_heads)], dim=1)

    def metadata_nbytes(self) -> int:
        """Bytes of bookkeeping (head ids, positions, scores, pad counts, kept queries) on top of keys and values."""
        state = (self.heads, self.positions, self.scores, self.n_pad, self.queries)
        return sum(t.untyped_storage().nbytes() for t in state if t is not None)


def pyramid_shares(n_layers: int, beta: float = 20.0) -> list[float]:
    """PyramidKV layer budgets (Cai et al. 2024, https://arxiv.org/abs/2406.02069) as multiples of the mean budget:
    linear from `2 - 1/beta` at the first compressed layer down to `1/beta` at the last (mean 1, so the same total)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta < 1:
        raise ValueError(f"pyramid_beta={beta!r} must be a number >= 1 (the last layer keeps 1/beta of the mean)")
    if n_layers == 1:
        return [1.0]
    low, high = 1 / beta, 2 - 1 / beta
    return [high - i * (high - low) / (n_layers - 1) for i in range(n_layers)]
