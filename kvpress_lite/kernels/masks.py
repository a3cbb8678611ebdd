"""Reading transformers' 4D attention masks for the decode kernels: per-row left padding (`kv_start`).

The kernels attend query `i` of `q` to keys `kv_start[b] <= j <= n_keys - q + i` (left padding, causal among the last
`q` keys). `kv_start_from_mask` checks on the host that a mask is exactly that (once per forward, memoized);
`decode_start` reads it on the device without a check (for compiled steps, after the host path checked the prompt).
"""

from __future__ import annotations

import threading

import torch

_local = threading.local()  # .memo: (mask, (q, n_keys), result) of the current forward


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """bool of the same shape: True where attended (bool masks as is; additive masks: 0 where attended)."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def kv_start_from_mask(attention_mask: torch.Tensor | None, q: int, n_keys: int):
    """Per-row first valid key for a decode kernel, if the mask is exactly what the kernel computes.

    Returns `(True, None)` for no mask (no padding), `(True, kv_start int32 [B])` when the 4D mask (bool or additive,
    `[B or 1, 1, q, n_keys]`) is left padding + causal, else `(False, None)` (e.g. right padding, a custom mask): the
    caller then runs the base attention. Memoized per mask object, so the check (one host sync) runs once per forward,
    not once per layer.
    """
    if attention_mask is None:
        return True, None
    memo = getattr(_local, "memo", None)
    if memo is not None and memo[0] is attention_mask and memo[1] == (q, n_keys):
        return memo[2]
    result = (False, None)
    if attention_mask.dim() == 4 and attention_mask.shape[1] == 1 and tuple(attention_mask.shape[2:]) == (q, n_keys):
        allowed = _allowed(attention_mask[:, 0])  # (B, q, K)
        start = allowed[:, -1].to(torch.int32).argmax(-1)  # first attended key of the last query (all pads: 0)
        pos = torch.arange(n_keys, device=allowed.device)
        qpos = n_keys - q + torch.arange(q, device=allowed.device)
        expected = (pos[None, None, :] >= start[:, None, None]) & (pos[None, None, :] <= qpos[None, :, None])
        if torch.equal(allowed.expand_as(expected), expected):
            result = (True, start.to(torch.int32))
    _local.memo = (attention_mask, (q, n_keys), result)
    return result


def decode_start(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Per-row first attended key `[B]` int32 from the last query row of a 4D mask `[B, 1, q, K]` (None: no mask).

    No host sync and no check (a compiled step cannot branch on data): callers check the prompt's mask with
    `kv_start_from_mask` on their host path first."""
    if attention_mask is None:
        return None
    return _allowed(attention_mask[:, 0, -1]).to(torch.int32).argmax(-1).to(torch.int32)


__all__ = ["decode_start", "kv_start_from_mask"]
