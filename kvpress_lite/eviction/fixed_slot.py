"""`FixedSlotLayer`: eviction whose decode step has fixed shapes (compileable, CUDA-graph safe).

The prompt goes through an `EvictionLayer` (the policy's own scoring and top-k, chunked prefill included). At the first
decode forward (`start_decoding`, on the host, before any compiled step) the kept tokens move into preallocated storage
(`fixed_slot_store`): `S = budget - R` slots plus a full-precision ring of `W = R + 1` entries (the `R` protected
tokens and the incoming one), `R = recent + slack // 2` (`ring_protects`). Each decode step then:

1. takes the token leaving the ring (position L - W) and writes it over the slot its policy ranks lowest, if it ranks
   higher than that slot (H2O's per-step greedy replacement, https://arxiv.org/abs/2306.14048); sinks and ring tokens
   are never replaced, empty and pad slots first;
2. writes the new token into the ring at `L % W`;
3. computes attention over the `S + W` entries with its own validity mask (empty slots, left pads); the
   probabilities, summed over each kv head's query heads, update the policy's scores (in position order for policies
   that pool over neighbours, snapkv). Quantized slots with an implementation of the decode seam that returns
   probabilities (`kernels.probs_impl`: the Triton kernel on CUDA, or one forced with `kernels.prefer`) run it over
   the packed slots (history) and the ring (residual), the output and the probabilities from one pass, validity from
   `positions >= n_pad` per entry; otherwise (bf16 slots, the CPU's "auto") the layer's own torch code: matmul,
   masked softmax, matmul over the dequantized slots.

With `slack=0` this is `EvictionCache(budget, recent, slack=0)` step for step: between steps `budget` tokens are kept,
a step attends to them and the incoming token (`budget + 1` entries), and the token that leaves the protected window
competes with the others on the scores of every step up to the previous one (tested: the same kept positions). With a
slack, `EvictionCache`'s protected window swings between `recent` and `recent + slack` tokens; this cache protects the
mean, within the same budget (docs/fixed-slot-eviction.md, "Measured": what that window is worth).

No shape changes, every index is computed on the device, no host sync: `is_compileable`. Keys keep their rotation.
Scores of attention-free policies (knorm, streaming, random) are fixed per token when it enters the cache.
"""

from __future__ import annotations

import torch

from .. import _compat, attention_bridge
from .._compat import CacheLayerMixin
from ..kernels.dispatch import AUTO, decode_probs_with, probs_impl
from ..kernels.fused import unplain_kwargs
from .fixed_slot_store import write_entries
from .layer import EvictionLayer
from .policy import EvictionBudget, EvictionPolicy, ScoreInputs

SUPPORTED_POLICIES = ("h2o", "tova", "snapkv", "knorm", "streaming", "random")
SUPPORTED_BITS = (None, 8, 4)
POSITION_ORDERED = ("snapkv",)  # policies whose score mixes neighbouring positions: scored in position order


def static_scores(policy: EvictionPolicy, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                  length) -> torch.Tensor:
    """Scores `[B, H, n]` of tokens `[B, H, n, D]` under an attention-free policy, fixed when they enter the cache.

    "random" draws from a hash of the position (compileable, no generator state) instead of the policy's generator."""
    if policy.name == "random":
        mixed = (positions.long() * 2654435761 + policy.seed * 40503) % 16777213
        return mixed.float() / 16777213.0
    return policy.score(ScoreInputs(keys, values, positions, length=length)).float()


class FixedSlotLayer(CacheLayerMixin):
    """One full-attention layer of `FixedSlotEvictionCache`; see the module docstring.

    State after `start_decoding`: `store` (a `SlotKV` / `QuantizedSlotKV`, `[B, H_kv, S + W, D]` logical entries,
    `S + W = budget + 1`, `W = ring_protects + 1`),
    `positions` int32 `[B, H_kv, S + W]` (token position of each entry, -1 when empty), `scores` fp32
    `[B, H_kv, S + W]`,
    `n_pad` int64 `[B]` (left pads per row; an entry is valid iff its position >= n_pad), `length` int64 0-dim (L).

    Args:
        policy: the `EvictionPolicy`. spec: an `EvictionBudget` (its slack widens the ring, `ring_protects`).
        layer_idx: the model layer. make_store: `(slots, window) -> SlotKV`, the storage kind.
        bf16_kernel: full-precision slots too run the decode seam (the Triton kernel's residual path over all
            entries, CUDA) instead of the torch path; off by default until measured (docs/fixed-slot-eviction.md).
        kernel_impl: the seam's implementation asked for ("auto"; "sdpa", which returns no probabilities, keeps the
            torch step everywhere; "triton" / "torch" force one).
    """

    is_sliding = False
    is_croppable = False
    is_compileable = True

    def __init__(self, policy: EvictionPolicy, spec: EvictionBudget, layer_idx: int, make_store,
                 bf16_kernel: bool = False, kernel_impl: str = AUTO):
        super().__init__()
        self.policy, self.spec, self.layer_idx, self.make_store = policy, spec, layer_idx, make_store
        self.bf16_kernel, self.kernel_impl = bool(bf16_kernel), kernel_impl
        self.window = spec.recent + 1  # W: the protected recent tokens and the incoming one (set by start_decoding)
        self.prompt = EvictionLayer(policy, spec, layer_idx)  # the prompt's eviction (full precision)
        self.store = self.positions = self.scores = self.n_pad = self.length = None
        self.decoding = False
        self._pending = False
        self._impl = None  # the decode seam's implementation for the step (`_seam`), decided in `start_decoding`
        self._like = None  # (batch, heads, dtype, device) the buffers were allocated for

    @property
    def is_initialized(self) -> bool:
        return self.decoding or self.prompt.is_initialized

    @is_initialized.setter
    def is_initialized(self, value) -> None:  # set by CacheLayerMixin.__init__; the state above decides
        pass

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    @property
    def capacity(self) -> int | None:
        """Entries per (row, head), S + W: the resolved budget + 1 (None before the prompt)."""
        if not self.decoding:
            return None if self.prompt.budget is None else self.prompt.budget + 1
        return self.store.slots + self.window

    # ------------------------------------------------------------------ prompt -> fixed slots (host, eager)
    def ring_protects(self, budget: int, slack: int) -> int:
        """Tokens the ring protects (`W - 1`): `recent + slack // 2`, at most `budget - max(sinks, 1)`.

        `EvictionCache`'s protected window swings between `recent` and `recent + slack` tokens (tokens that leave it
        stay until the next gather), `recent + slack / 2` on average; this cache cannot swing, so it protects the
        mean, within the same budget. `slack=0`: exactly `EvictionCache(slack=0)`."""
        return min(self.spec.recent + slack // 2, budget - max(self.spec.sinks, 1))

    def start_decoding(self) -> None:
        """Move the prompt's kept tokens into the fixed slots and ring (once, on the host, before the first step)."""
        prompt = self.prompt
        budget = prompt.budget
        if prompt.physical_length > budget:
            prompt.evict(budget)
        protected = self.ring_protects(budget, prompt.slack)
        slots, w = budget - protected, protected + 1
        if slots < 1:
            raise ValueError(f"FixedSlotEvictionCache: the resolved budget={budget} leaves no slot next to "
                             f"recent={self.spec.recent}; raise ratio or budget, or lower recent")
        self.window = w
        keys, values = prompt.store.read()  # (B, H, P, D), P <= budget
        b, h, _, d = keys.shape
        length, positions = prompt.length, prompt.positions
        if self.policy.uses_attention:
            scores = prompt.scores
        else:
            scores = static_scores(self.policy, keys, values, positions, length)
        n = slots + w
        # destination of each kept token: the last W positions to their ring entry, the S best others (sinks first,
        # pads last) to slots in position order, the rest dropped (index n, cut below). Others beyond S exist when the
        # ring protects more than `recent` (slack) or the row has fewer than W real tokens (then they are pads).
        recent = positions >= length - w  # (B, H, P)
        ranked = self.spec.protect(scores, positions, prompt.n_pad[:, None, None], length).masked_fill(recent, -1e30)
        by_score = torch.empty_like(positions, dtype=torch.long).scatter_(
            2, ranked.argsort(dim=-1, descending=True, stable=True), torch.arange(
                positions.shape[-1], device=keys.device).expand_as(positions).contiguous())  # 0 = best
        kept = ~recent & (by_score < slots)
        rank = kept.long().cumsum(dim=-1) - 1
        dest = torch.where(recent, slots + positions.long() % w, torch.where(kept, rank, n))  # (B, H, P)
        dense_pos = torch.full((b, h, n + 1), -1, dtype=torch.int32, device=keys.device)
        dense_pos.scatter_(2, dest, positions)
        dense_scores = torch.zeros((b, h, n + 1), dtype=torch.float32, device=keys.device)
        dense_scores.scatter_(2, dest, scores.float())
        dense_kv = [torch.zeros(b, h, n + 1, d, dtype=t.dtype, device=t.device).scatter_(
            2, dest[..., None].expand(-1, -1, -1, d), t) for t in (keys, values)]
        if self.store is None or (self.store.slots, self.store.window, self._like) != (
                slots, w, (b, h, keys.dtype, keys.device)):
            self._like = (b, h, keys.dtype, keys.device)
            self.store = self.make_store(slots, w)
            self.store.allocate(keys)
            self.positions = torch.empty((b, h, n), dtype=torch.int32, device=keys.device)
            self.scores = torch.empty((b, h, n), dtype=torch.float32, device=keys.device)
            self.n_pad = torch.zeros(b, dtype=torch.int64, device=keys.device)
            self.length = torch.zeros((), dtype=torch.int64, device=keys.device)
            for t in (self.positions, self.scores, self.n_pad, self.length):
                _compat.mark_static_address(t)
        self.store.fill(dense_kv[0][:, :, :n], dense_kv[1][:, :, :n])
        self.positions.copy_(dense_pos[:, :, :n])
        self.scores.copy_(dense_scores[:, :, :n])
        self.n_pad.copy_(prompt.n_pad)
        self.length.fill_(length)
        prompt.reset()  # frees the prompt's storage; the fixed buffers are all this layer keeps now
        self._impl = self._seam(keys)  # decided once, on the host: the compiled step traces only the op
        self.decoding = True

    # ------------------------------------------------------------------ transformers' layer interface
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Prompt: the `EvictionLayer`'s update. Decode step (`[B, H, 1, D]`): in-place writes, then the bridge runs
        `attend` (see the module docstring)."""
        q = key_states.shape[-2]
        if not self.decoding and not (q == 1 and self.prompt.is_initialized):
            return self.prompt.update(key_states, value_states)
        if not _compat.is_compiling():
            self._check_step(key_states)
            if not self.decoding:
                self.start_decoding()
        self._write_step(key_states[:, :, 0], value_states[:, :, 0])
        # --- attention-bridge handshake (one place; the bridge then calls `attend`) ---
        self._pending = True
        if getattr(self.store, "bits", None) and self._impl is not None:
            returned = (self.store.ring_keys, self.store.ring_values)  # the kernel reads the codes: no dequantized copy
        else:
            returned = self.store.read()
        attention_bridge.expect(self, returned[0])
        return returned

    def _check_step(self, key_states: torch.Tensor) -> None:
        if self._pending:
            raise RuntimeError(f"FixedSlotLayer {self.layer_idx}: the previous step's attention did not run through "
                               "the cache (the model's attn_implementation changed, or the cache was detached).")
        q, b = key_states.shape[-2], key_states.shape[0]
        if q != 1:
            raise ValueError(f"FixedSlotEvictionCache decodes one token per forward once decoding started; got {q} "
                             "tokens (assisted/speculative decoding, or a continued prompt): call cache.reset() first")
        if self.decoding and b != self.positions.shape[0]:
            raise ValueError(f"FixedSlotEvictionCache: batch size changed from {self.positions.shape[0]} to {b} "
                             "during decoding; its slots are preallocated per row (batch_repeat_interleave and "
                             "batch_select_indices between steps are followed, other batch changes are not): build a "
                             "new cache")

    def _write_step(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Steps 1-2 of the module docstring for one token `[B, H, D]`; fixed shapes, indices on the device."""
        s, w, sinks = self.store.slots, self.window, self.spec.sinks
        ring = self.length % w  # 0-dim: the new token's ring entry, holding position L - W (or nothing)
        entry = (ring + s).view(1)
        leave_k, leave_v = self.store.ring_token(ring)
        leave_pos = self.positions.index_select(2, entry)[:, :, 0]  # (B, H)
        leave_score = self.scores.index_select(2, entry)[:, :, 0]
        pads = self.n_pad[:, None]
        leave_rank = leave_pos.long() - pads
        leave_key = leave_score.masked_fill(leave_rank < sinks, float("inf")).masked_fill(leave_rank < 0, -float("inf"))
        slot_rank = self.positions[:, :, :s].long() - pads[..., None]
        slot_key = self.scores[:, :, :s].masked_fill(slot_rank < sinks, float("inf"))
        slot_key = slot_key.masked_fill(slot_rank < 0, -float("inf"))  # (B, H, S): empty/pad slots go first
        target = slot_key.argmin(dim=-1)  # (B, H)
        write = leave_key > slot_key.gather(2, target[..., None])[..., 0]
        self.store.write_slot(target, leave_k, leave_v, write)
        write_entries(self.positions, target, leave_pos, write)
        write_entries(self.scores, target, leave_score, write)
        b, h = key.shape[:2]
        self.store.write_ring(ring.view(1), key[:, :, None], value[:, :, None])
        new_pos = self.length.to(torch.int32).expand(b, h, 1)
        self.positions.index_copy_(2, entry, new_pos)
        if self.policy.uses_attention:
            new_score = torch.zeros(b, h, 1, dtype=torch.float32, device=key.device)
        else:
            new_score = static_scores(self.policy, key[:, :, None], value[:, :, None], new_pos, self.length + 1)
        self.scores.index_copy_(2, entry, new_score)
        self.length.add_(1)

    def _seam(self, like: torch.Tensor):
        """The decode seam's implementation that runs this step over the packed slots, or None (the torch path):
        quantized slots and an implementation `select` picks that also returns probabilities (`probs_impl`: on CUDA
        the Triton kernel; on a CPU none unless forced with `kernels.prefer("triton" | "torch")`). Full-precision
        slots take the torch path (compiled with the step) unless `bf16_kernel`: then every entry is the kernel's
        full-precision residual (`SlotKV.packed`)."""
        bits = getattr(self.store, "bits", None)
        if bits is None:
            if not self.bf16_kernel:
                return None
            return probs_impl(self.kernel_impl, like.device, like.dtype, like.shape[-1], 8, like.shape[-1], "token")
        return probs_impl(self.kernel_impl, like.device, like.dtype, like.shape[-1], bits, self.store.group_size,
                          "token")

    def attend(self, base, module, query, key, value, attention_mask, **kwargs):
        """Step 3 (called by the attention bridge): `[B, 1, H_q, D]` attention over the valid entries, and the scores.

        `query` `[B, H_q, 1, D]`; `key`/`value` `[B, H_kv, S + W, D]` (what `update` returned: on the kernel path only
        the ring `[B, H_kv, W, D]`, unused); the model's mask is not read (its shape is the constant
        `get_mask_sizes`; validity comes from `positions` and `n_pad`)."""
        self._pending = False
        bad = unplain_kwargs(kwargs)
        if bad:
            raise ValueError(f"FixedSlotEvictionCache layer {self.layer_idx}: the model's attention asks for {bad}; "
                             "the fixed-slot step computes plain softmax attention (scaling, softcap) only")
        b, hq, q, d = query.shape
        scaling = kwargs.get("scaling") or d**-0.5
        if self._impl is not None:  # one kernel pass: output and per-entry probabilities
            out, mass = decode_probs_with(self._impl, query, self.store.packed(), self.n_pad, scaling,
                                          kwargs.get("softcap"), self.positions, self.policy.uses_attention)
            if self.policy.uses_attention:
                self.scores.copy_(self._score(mass))
            return out.transpose(1, 2).contiguous(), None
        # slots-major products (the slots are each GEMM's long dimension: K . q^T, then V^T . P^T): on an H100 one
        # layer's step at 8 x 2049 slots took 0.064 ms this way against 0.126 ms for the q . K^T / P . V products,
        # which cuBLAS runs with generic batched kernels for G = 4 query rows (benchmarks/attention_products.py)
        h = key.shape[1]
        g = hq // h
        queries_t = query.reshape(b, h, g * q, d).transpose(-1, -2)  # (B, H, D, G)
        logits = torch.matmul(key, queries_t).float() * scaling  # (B, H, N, G)
        softcap = kwargs.get("softcap")
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        valid = self.positions >= self.n_pad[:, None, None].to(torch.int32)  # (B, H, N)
        probs = logits.masked_fill(~valid[..., None], -float("inf")).softmax(dim=2)  # (B, H, N, G)
        out = torch.matmul(value.transpose(-1, -2), probs.to(value.dtype))  # (B, H, D, G)
        if self.policy.uses_attention:
            self.scores.copy_(self._score(probs.sum(dim=-1)))  # mass (B, H, N): summed over the kv head's query heads
        return out.transpose(-1, -2).reshape(b, hq, q, d).transpose(1, 2).contiguous(), None

    def _score(self, mass: torch.Tensor) -> torch.Tensor:
        """The policy's new scores `[B, H, N]` from this step's attention `mass` `[B, H, N]` fp32. Slot order is not
        position order after a replacement; a policy that pools over neighbours (`POSITION_ORDERED`) is scored on
        the entries sorted by position (empty slots first, with no mass) and scattered back, as `EvictionCache`, whose
        entries stay in position order, scores them."""
        positions, previous = self.positions, self.scores
        if self.policy.name not in POSITION_ORDERED:
            return self.policy.score(ScoreInputs(None, None, positions, mass, previous, self.length, 1))
        order = positions.argsort(dim=-1)  # (B, H, N) int64
        sorted_inputs = ScoreInputs(None, None, positions.gather(2, order), mass.gather(2, order),
                                    previous.gather(2, order), self.length, 1)
        scored = self.policy.score(sorted_inputs)
        return torch.empty_like(scored).scatter_(2, order, scored)

    def get_seq_length(self):
        """Logical length L: an int during the prompt, a 0-dim device tensor while decoding (no host sync; a copy,
        as the buffer itself changes in place every step)."""
        return self.length.clone() if self.decoding else self.prompt.get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Decode steps: `(S + W, 0)`, a constant (the step builds its own mask); prompt: the `EvictionLayer`'s."""
        if self.decoding or (query_length == 1 and self.prompt.is_initialized):
            return self.capacity, 0
        return self.prompt.get_mask_sizes(query_length)

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1 if self.capacity is None else self.capacity

    def reset(self) -> None:
        """Forget every token (the buffers, and so compiled graphs, are reused by a prompt of the same budget)."""
        self.prompt.reset()
        self.decoding = self._pending = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError(f"crop({tokens_to_remove}) is not supported by FixedSlotEvictionCache "
                             "(is_croppable=False)")

    # ------------------------------------------------------------------ batch operations
    def _state(self):
        return [getattr(self.store, n) for n in self.store.state_names] + [self.positions, self.scores, self.n_pad]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: reorder slots, ring, positions, scores and pad counts in place (addresses kept)."""
        if not self.decoding:
            self.prompt.reorder_cache(beam_idx)
            return
        for tensor in self._state():
            tensor.copy_(tensor.index_select(0, beam_idx.to(tensor.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row `repeats` times (before decoding: the prompt's layer; after: new buffers, eagerly)."""
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0), "batch_repeat_interleave")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices` (before decoding: the prompt's layer; after: new buffers, eagerly)."""
        self._map_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices],
                        "batch_select_indices")

    def _map_batch(self, fn, name: str) -> None:
        """Apply a batch operation: to the prompt's `EvictionLayer`, or to every buffer, which is then reallocated (a
        host-side operation between compiled steps: the next step compiles again for the new buffers)."""
        if not self.decoding:
            self.prompt._map_state(fn)  # BatchStateMixin: what EvictionLayer.batch_* do
            return
        if _compat.is_compiling():
            raise ValueError(f"FixedSlotEvictionCache cannot {name} inside a compiled step (its buffers are fixed)")
        for holder, names in ((self.store, self.store.state_names), (self, ("positions", "scores", "n_pad"))):
            for attr in names:
                tensor = fn(getattr(holder, attr)).contiguous()
                _compat.mark_static_address(tensor)
                setattr(holder, attr, tensor)
        self._like = (self.positions.shape[0], *self._like[1:])
