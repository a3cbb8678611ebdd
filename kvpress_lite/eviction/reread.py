"""The re-read pass of query-agnostic policies (KVzip): run the model once more over the prompt, with a transient
reader cache standing in for the evicting layers, and score each cached token by the largest attention it receives.

`RereadHook` (a forward pre-hook that `EvictionCache` registers for policies with `rereads = True`, removed by its
`detach()`) runs it at the first one-token forward after the prompt, then every layer evicts to its budget.
"""

from __future__ import annotations

import weakref

import torch

from .. import attention_bridge
from .._compat import Cache, CacheLayerMixin, cache_kwarg, scratch_copy
from . import observe
from .layer import EvictionLayer


class _ReaderLayer(CacheLayerMixin):
    """Stands in for an `EvictionLayer` during the re-read: attention reads its kept slots plus the chunk, the chunk is
    never stored, and the largest probability each kept slot receives is accumulated into `scores` `[B, H_kv, P]`."""

    is_sliding = False
    is_compileable = False

    def __init__(self, layer: EvictionLayer):
        super().__init__()
        self.layer, self.layer_idx = layer, layer.layer_idx
        self.keys, self.values = layer.store.read()
        self.scores = torch.zeros(layer.positions.shape, dtype=torch.float32, device=self.keys.device)
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        """Nothing to allocate: the kept slots are read at construction."""

    def update(self, key_states, value_states, *args, **kwargs):
        keys = torch.cat([self.keys, key_states], dim=-2)
        attention_bridge.expect(self, keys)
        return keys, torch.cat([self.values, value_states], dim=-2)

    def attend(self, base, module, query, key, value, attention_mask, **kwargs):
        output, weights = base(module, query, key, value, attention_mask, **kwargs)
        q, P = query.shape[-2], self.keys.shape[-2]
        is_real = observe.real_keys(attention_mask)
        query_real = None if is_real is None else is_real[:, -q:]
        top = observe.attention_mass(query, key, attention_mask, weights, kwargs.get("scaling"), kwargs.get("softcap"),
                                     None, query_real, "max")  # (B, H_kv, P + q)
        self.scores = torch.maximum(self.scores, top[..., :P])
        return output, weights

    def get_seq_length(self) -> int:
        return self.layer.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        P = self.keys.shape[-2]
        return P + query_length, self.layer.length - P

    def get_max_length(self) -> int:
        return -1


def layer_budgets(layers: list[EvictionLayer], scores: list[torch.Tensor]) -> list[int]:
    """Budgets from one ranking across layers (KVzip's non-uniform ratio): the layers' summed budgets, in slots per
    row and KV head, go to the top `scores` `[B, H_kv, P_i]` of all layers and heads pooled per row (sinks and recent
    tokens protected, pads last). Layer i's budget is its share of that top-k, per KV head, averaged over rows and
    rounded down, at least its protected tokens and `sinks + recent`: the total never exceeds the uniform one's by more
    than those floors."""
    protected = [layer.protected_scores(s) for layer, s in zip(layers, scores)]
    heads = [p.shape[1] for p in protected]
    total = sum(layer.budget * h for layer, h in zip(layers, heads))
    pooled = torch.cat([p.flatten(1) for p in protected], dim=1)  # (B, sum_i H_i P_i)
    top = pooled.topk(min(total, pooled.shape[1]), dim=1).indices
    owner = torch.cat([torch.full((p[0].numel(),), i, device=pooled.device) for i, p in enumerate(protected)])
    counts = torch.bincount(owner[top].flatten(), minlength=len(layers)).float() / pooled.shape[0]
    budgets = []
    for i, layer in enumerate(layers):
        floor = max(int(torch.isinf(protected[i]).logical_and(protected[i] > 0).sum(-1).max()),
                    layer.spec.sinks + layer.spec.recent, 1)
        budgets.append(max(int(counts[i].item() // heads[i]), floor))
    return budgets


@torch.no_grad()
def reread(model, cache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, chunk_size: int,
           layerwise: bool = False) -> None:
    """Score every `EvictionLayer` of `cache` by the largest attention from a chunked re-read of `input_ids`
    `[B, L]` (the prompt, left-padded per `attention_mask` `[B, L]`), then evict each to its budget (`layerwise`), or
    to budgets set by one ranking across layers (`layer_budgets`; same total, kept for the rest of generation)."""
    B, L = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    n_real = mask.sum(dim=1, keepdim=True)  # (B, 1): the re-read continues each row's positions
    readers = {i: _ReaderLayer(layer) for i, layer in enumerate(cache.layers) if isinstance(layer, EvictionLayer)}
    for start in range(0, L, chunk_size):
        stop = min(start + chunk_size, L)
        layers = [readers.get(i) or scratch_copy(layer) for i, layer in enumerate(cache.layers)]
        reader = Cache(layers=layers)
        chunk_mask = mask[:, start:stop]
        position_ids = (n_real + (chunk_mask.cumsum(1) - 1).clamp(min=0)).long()
        model(input_ids=input_ids[:, start:stop], attention_mask=torch.cat([mask, chunk_mask], dim=1),
              position_ids=position_ids, use_cache=True, **{cache_kwarg(model): reader})
    for i, reader in readers.items():
        cache.layers[i].scores = reader.scores
    if not layerwise and readers:
        layers = [cache.layers[i] for i in readers]
        for layer, budget in zip(layers, layer_budgets(layers, [layer.scores for layer in layers])):
            layer.budget = budget
    for i in readers:
        layer = cache.layers[i]
        if layer.physical_length > layer.budget + layer.slack:
            layer.evict(layer.budget)


class RereadHook:
    """Forward pre-hook: records the prompt's forwards, and before the first one-token forward after them runs
    `reread` (with the hook disarmed, so the nested forward passes through). `remove()` detaches it (idempotent)."""

    def __init__(self, model, cache, chunk_size: int, layerwise: bool = False):
        self._cache = weakref.ref(cache)  # the hook must not keep the cache alive
        self._model = weakref.ref(model)
        self.chunk_size, self.layerwise = chunk_size, layerwise
        self._ids, self._mask, self._busy = [], None, False
        self._handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        cache = self._cache()
        if self._busy or cache is None or kwargs.get(cache_kwarg(module)) is not cache:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        layer = next((x for x in cache.layers if isinstance(x, EvictionLayer)), None)
        if layer is None or not layer.in_prompt:
            return None
        if ids is None:
            raise ValueError("the kvzip policy re-reads the prompt, so it needs input_ids (got inputs_embeds)")
        if ids.shape[1] > 1 or layer.length == 0:  # a prompt forward (or chunk of one)
            if layer.length == 0:
                self._ids = []
            self._ids.append(ids)
            self._mask = kwargs.get("attention_mask")
            return None
        prompt = torch.cat(self._ids, dim=1)
        mask = None if self._mask is None else self._mask[:, : prompt.shape[1]]
        self._busy = True
        try:
            reread(module, cache, prompt, mask, self.chunk_size, self.layerwise)
        finally:
            self._busy, self._ids = False, []
        return None

    def remove(self) -> None:
        self._handle.remove()
