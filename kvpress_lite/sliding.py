"""`StaticSlidingWindowKVLayer`: a compileable full-precision sliding-window (or chunked) layer (static caches).

transformers' `StaticSlidingWindowLayer` keeps its length in a Python int (`cumulative_length_int`) that `update` reads:
under torch.compile every decode step fails that guard and recompiles. This layer keeps the same tensors but its
lengths on the device, so a decode step is one graph:

- `keys`/`values` `[B, H, W, D]` (model dtype, `W = min(sliding_window, max_cache_len)`): the last `W` tokens in
  position order (slot `j` holds token `max(seen - W, 0) + j`); `seen` int64 0-dim: tokens seen; `kv_start` int64
  `[B]`: each row's first valid token (left padding), taken from the prompt's mask. All marked as static addresses.
- host path (the prompt, forwards of more than 16 tokens, every forward when not fused): exactly transformers'
  `StaticSlidingWindowLayer` (same returned tensors, same `get_mask_sizes`, same contents), lengths read on the host.
- step path (fused, q <= 16, no host sync, no branch on data): `update` returns `cat(window, new)` `[B, H, W + q, D]`
  (every key any of the q queries may see, also for q > 1 with a full window) and rewrites the window in place with a
  gather whose indices are computed on the device; `attend` builds the mask itself from `seen`, the window, causality
  and `kv_start` (the model's step mask is shaped by `get_mask_sizes` = the constant `(W, 0)` and is ignored).

Sliding window attention: Longformer, https://arxiv.org/abs/2004.05150 (as used by Mistral / Gemma 2-3).
"""

from __future__ import annotations

import threading

import torch

from . import _compat
from ._compat import CacheLayerMixin
from .attention_bridge import BridgedLayerMixin
from .layer_state import FixedShapeLayerMixin, check_fits

_memo = threading.local()  # .last: (key, start or None) of the last checked host-path mask (shared by every layer)


def allowed_keys(pos: torch.Tensor, qpos: torch.Tensor, start: torch.Tensor, window: int,
                 chunked: bool) -> torch.Tensor:
    """Boolean mask `[B, 1, q, K]`: query at token position `qpos[i]` may attend key at token position `pos[k]`.

    Causal, at or after the row's first valid token `start[b]` (left padding), and within the last `window` tokens
    (sliding, transformers' `kv_idx > q_idx - window`) or in the same chunk counted from `start` (chunked, transformers'
    `chunked_overlay`). `pos` `[K]`, `qpos` `[q]`, `start` `[B]`, all int64 on one device.
    """
    p, qp, s = pos[None, None, None, :], qpos[None, None, :, None], start[:, None, None, None]
    allowed = (p <= qp) & (p >= s)
    if chunked:
        return allowed & (torch.div(p - s, window, rounding_mode="floor") ==
                          torch.div(qp - s, window, rounding_mode="floor"))
    return allowed & (p > qp - window)


class StaticSlidingWindowKVLayer(FixedShapeLayerMixin, BridgedLayerMixin, CacheLayerMixin):
    """Sliding-window (or chunked) layer with fixed shapes and device lengths; see the module docstring.

    Args:
        max_cache_len: tokens the cache holds (prompt + new tokens); the window is `min(sliding_window, max_cache_len)`.
        sliding_window: the model's window (`config.sliding_window`) or chunk size (`config.attention_chunk_size`).
        layer_idx: the model layer (the attention bridge checks it).
        chunked: True for chunked attention (Llama 4), False for a sliding window.
    """

    is_sliding = True
    is_croppable = False
    is_compileable = True

    def __init__(self, max_cache_len: int, sliding_window: int, layer_idx: int, chunked: bool = False):
        super().__init__()
        self.sliding_window, self.chunked, self.layer_idx = sliding_window, chunked, layer_idx
        self.max_cache_len = min(sliding_window, max_cache_len)  # W, as transformers' StaticSlidingWindowLayer
        self.attachment = None  # set by the cache when it decodes through the attention bridge
        self.seen = self.kv_start = None
        self._host_seen = 0  # tokens seen before the current host-path forward (eager only)

    # ------------------------------------------------------------------ transformers' layer interface
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        dev, dt = key_states.device, key_states.dtype
        self.keys = torch.zeros(b, h, self.max_cache_len, d, dtype=dt, device=dev)
        self.values = torch.zeros(b, h, self.max_cache_len, value_states.shape[-1], dtype=dt, device=dev)
        self.seen = torch.zeros((), dtype=torch.int64, device=dev)
        self.kv_start = torch.zeros(b, dtype=torch.int64, device=dev)
        for tensor in (self.keys, self.values, self.seen, self.kv_start):
            _compat.mark_static_address(tensor)
        self.device, self.dtype = dev, dt
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append `[B, H, q, D]` states; return the keys/values the attention reads (see the module docstring)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._steps(key_states.shape[-2]):
            return self._update_step(key_states, value_states)
        if not _compat.is_compiling():
            check_fits(self.keys, key_states)
        out = self._update_host(key_states, value_states)
        if self.fused:
            self.expect_attention(out[0])
        return out

    def _update_host(self, keys: torch.Tensor, values: torch.Tensor):
        """transformers' `StaticSlidingWindowLayer.update`, the length read from the device."""
        s, q, w = int(self.seen), keys.shape[-2], self.max_cache_len
        self._host_seen = s
        self.seen.add_(q)
        if s >= w and q == 1:  # full: shift left by one, the new token last; attend over the window
            self.keys.copy_(torch.cat([self.keys[:, :, 1:], keys], dim=-2))
            self.values.copy_(torch.cat([self.values[:, :, 1:], values], dim=-2))
            return self.keys, self.values
        if s >= w:  # full, several tokens: attend over the W - 1 previous ones and the new ones
            full_k = torch.cat([self.keys[:, :, 1:], keys], dim=-2)
            full_v = torch.cat([self.values[:, :, 1:], values], dim=-2)
        elif s + q > w:  # becoming full: attend over everything seen
            full_k = keys if s == 0 else torch.cat([self.keys[:, :, :s], keys], dim=-2)
            full_v = values if s == 0 else torch.cat([self.values[:, :, :s], values], dim=-2)
        else:  # still fits: write at slot s, attend over the window (the mask hides slots >= s + q)
            self.keys[:, :, s : s + q] = keys
            self.values[:, :, s : s + q] = values
            return self.keys, self.values
        self.keys.copy_(full_k[:, :, -w:])
        self.values.copy_(full_v[:, :, -w:])
        return full_k, full_v

    def _update_step(self, keys: torch.Tensor, values: torch.Tensor):
        """Branch-free: return `cat(window, new)` `[B, H, W + q, D]`, keep its last valid W tokens in place."""
        q, w = keys.shape[-2], self.max_cache_len
        s = self.seen
        ext_k = torch.cat([self.keys, keys], dim=-2)
        ext_v = torch.cat([self.values, values], dim=-2)
        # window slot j must hold token p = max(s + q - W, 0) + j: an old slot if p < s, else a new token
        p = (s + q - w).clamp(min=0) + torch.arange(w, device=keys.device)
        src = torch.where(p < s, p - (s - w).clamp(min=0), p - s + w).clamp(max=w + q - 1)  # past s + q: unused slots
        self.keys.copy_(ext_k.index_select(2, src))
        self.values.copy_(ext_v.index_select(2, src))
        self.seen.add_(q)
        self.expect_attention(ext_k)
        return ext_k, ext_v

    def bridged_attention(self, base, module, query, key, value, attention_mask, **kwargs):
        """Through the bridge: on the step path `base` with this layer's own mask, else `base` unchanged (after
        recording the rows' left padding from the prompt's mask)."""
        q = query.shape[-2]
        if self._steps(q):
            mask = self._step_mask(q, key.shape[-2], attention_mask, query.dtype)
            return base(module, query, key, value, mask, **kwargs)
        self._record_start(attention_mask, q, key.shape[-2])
        return base(module, query, key, value, attention_mask, **kwargs)

    def _step_mask(self, q: int, n_keys: int, model_mask, dtype) -> torch.Tensor:
        """`[B, 1, q, W + q]` mask over `cat(window before this step, new)` (bool, or additive like the model's)."""
        w, dev = self.max_cache_len, self.seen.device
        s = self.seen - q  # tokens seen before this step
        e = torch.arange(n_keys, device=dev)
        # old slot e holds token max(s - W, 0) + e (valid if e < s), new token i sits at W + i (token s + i);
        # invalid slots get a position past every query, so causality hides them
        pos = torch.where(e < w, (s - w).clamp(min=0) + e, s + e - w)
        pos = torch.where((e >= w) | (e < s), pos, s + q)
        qpos = s + torch.arange(q, device=dev)
        allowed = allowed_keys(pos, qpos, self.kv_start, self.sliding_window, self.chunked)
        # a query that may see no key (e.g. a fully padded row) attends to itself: no NaN from an empty softmax
        own = (e[None, :] == w + torch.arange(q, device=dev)[:, None])[None, None]
        allowed = allowed | (own & ~allowed.any(-1, keepdim=True))
        if model_mask is None or model_mask.dtype == torch.bool:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill(~allowed, torch.finfo(dtype).min)

    def _record_start(self, attention_mask, q: int, n_keys: int) -> None:
        """Host path, fused: check the mask is causal + left padding + this layer's window (a compiled step builds
        exactly that), and on the prompt (nothing seen before) store each row's first valid token in `kv_start`."""
        s = self._host_seen
        if attention_mask is None:  # no padding (sdpa skipped the mask)
            if s == 0:
                self.kv_start.zero_()
            return
        stored = None if s == 0 else tuple(self.kv_start.tolist())
        key = (attention_mask, s, q, n_keys, self.max_cache_len, self.sliding_window, self.chunked, stored)
        last = getattr(_memo, "last", None)
        if last is not None and last[0][0] is attention_mask and last[0][1:] == key[1:]:
            start = last[1]
        else:
            start = self._start_from_mask(attention_mask, s, q, n_keys)
            _memo.last = (key, start)
        if start is None:
            raise ValueError(
                f"StaticQuantizedKVCache sliding layer {self.layer_idx}: a compiled decode step builds its own mask, "
                "which supports left padding only; this forward's attention mask is not causal + left padding + "
                "sliding window (right padding, or a custom mask). Pad on the left (tokenizer.padding_side = 'left') "
                "or pass fused=False."
            )
        if s == 0:
            self.kv_start.copy_(start.expand_as(self.kv_start))

    def _start_from_mask(self, attention_mask, s: int, q: int, n_keys: int):
        """`kv_start` `[B or 1]` if `attention_mask` is exactly what `allowed_keys` computes, else None."""
        if attention_mask.dim() != 4 or attention_mask.shape[1] != 1 or attention_mask.shape[2] != q \
                or attention_mask.shape[3] < n_keys:
            return None
        m = attention_mask[:, 0, :, :n_keys]
        allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2  # additive: 0 where attended
        dev = m.device
        offset = max(s - self.max_cache_len + 1, 0)  # token position of key 0 (transformers' kv_offset)
        pos = offset + torch.arange(n_keys, device=dev)
        if s == 0:
            start = allowed.any(1).to(torch.int32).argmax(-1).to(torch.int64)  # first key any query attends
        else:
            start = self.kv_start
        expected = allowed_keys(pos, s + torch.arange(q, device=dev), start, self.sliding_window, self.chunked)[:, 0]
        if expected.shape[0] != allowed.shape[0] and allowed.shape[0] != 1:
            return None
        if not torch.equal(allowed.expand_as(expected), expected):
            return None
        return start

    def get_seq_length(self):
        """Tokens seen: a 0-dim device tensor once allocated (no host sync), else 0."""
        return self.seen if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset): `(W, 0)` on the step path (its mask is built in `attend`), else transformers'."""
        w = self.max_cache_len
        if self._steps(query_length):
            return w, 0
        s = int(self.seen) if self.is_initialized else 0
        offset = max(s - w + 1, 0)
        if s >= w:
            return w + query_length - 1, offset
        if s + query_length > w:
            return s + query_length, offset
        return w, offset

    def get_max_length(self) -> int:
        return self.max_cache_len

    def get_max_cache_shape(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        """Forget every token; buffers (and their addresses, so compiled graphs) are kept. The next forward takes the
        host path (it records the new prompt's left padding)."""
        if self.is_initialized:
            self.seen.zero_()
            self.kv_start.zero_()
        self.reset_bridge()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch in place for beam search."""
        if self.is_initialized:
            for tensor in (self.keys, self.values, self.kv_start):
                tensor.copy_(tensor.index_select(0, beam_idx.to(tensor.device)))
