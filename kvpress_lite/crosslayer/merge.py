"""MiniCache merging of two layers' KV (arXiv 2405.14366): the math, and the state a merged pair keeps.

Per token and KV head, the two layers' vectors `x_a` (layer l-1) and `x_b` (layer l) are split into magnitudes
`|x|` and unit directions; the pair keeps one direction, the spherical interpolation (SLERP) of the two unit vectors
at weight `t` (paper: t = 0.6, towards layer l), and each layer's magnitude. Restoring layer a gives `|x_a| * e`.
Tokens whose two vectors are most distinct (largest angular distance `Omega / pi`) are *retained*: their original
vectors are kept for both layers with their indices and put back on restore. The paper's abstract and method text
state the intent ("keep highly distinct state pairs unmerged"); retaining the most similar pairs instead keeps tokens
that merging already restores well. Keys and values are merged and ranked separately.

We retain a fixed fraction of every merged block of tokens (the paper thresholds the distance relative to its range),
so each (batch row, KV head) keeps the same number of retained tokens: rectangular tensors, predictable bytes.
"""

from __future__ import annotations

import math

import torch

from ..layer_state import BatchStateMixin
from ..storage import StorageSpec

EPS = 1e-6


def unit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(`x / |x|`, `|x|`) along the last dim, in fp32; a zero vector gets a zero direction."""
    x = x.float()
    norm = x.norm(dim=-1, keepdim=True)
    return x / norm.clamp_min(EPS), norm.squeeze(-1)


def slerp(u_a: torch.Tensor, u_b: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical interpolation of unit vectors `[..., D]` at weight `t` (0: u_a, 1: u_b).

    Returns (unit direction `[..., D]`, angular distance `Omega / pi` in [0, 1] `[...]`). Nearly (anti)parallel pairs,
    where sin(Omega) vanishes, fall back to the normalized linear interpolation.
    """
    cos = (u_a * u_b).sum(-1).clamp(-1.0, 1.0)
    omega = torch.acos(cos)
    sin = torch.sin(omega)
    safe = sin > 1e-4
    w_a = torch.where(safe, torch.sin((1 - t) * omega) / sin.clamp_min(1e-4), torch.full_like(sin, 1 - t))
    w_b = torch.where(safe, torch.sin(t * omega) / sin.clamp_min(1e-4), torch.full_like(sin, t))
    direction = w_a.unsqueeze(-1) * u_a + w_b.unsqueeze(-1) * u_b
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(EPS)
    return direction, omega / math.pi


def retained_per_block(retain: float, block: int) -> int:
    """Tokens retained unmerged out of each block of `block` merged tokens."""
    return min(block, round(retain * block))


def most_distinct(distance: torch.Tensor, keep: int, block: int) -> torch.Tensor:
    """Indices `[B, H, n // block * keep]` (into the n tokens) of the `keep` largest distances of each block.

    Args:
        distance: `[B, H, n]` angular distances, n a multiple of `block`.
    """
    B, H, n = distance.shape
    blocks = distance.view(B, H, n // block, block)
    top = blocks.topk(keep, dim=-1).indices  # (B, H, n/block, keep)
    offsets = torch.arange(0, n, block, device=distance.device).view(1, 1, -1, 1)
    return (top + offsets).flatten(2).sort(dim=-1).values


class MergedPair(BatchStateMixin):
    """The KV of two layers (a = l-1, b = l) after MiniCache merging: T merged tokens.

    State (batch first, so beam search reorders it; only the pair's owner layer lists it in its `state_names`):
        directions: a storage (`storage.StorageSpec`, no full-precision window) whose keys/values are the shared unit
            directions of keys/values `[B, H, T, D]` (quantized with the cache's `bits`).
        norms: `[B, H, T, 4]` magnitudes (key a, key b, value a, value b), cache dtype.
        key_index / value_index: `[B, H, K]` int32, merged-token index of each retained key / value.
        retained_a / retained_b: storages of layer a's / b's original retained keys (at key_index) and values
            (at value_index), `[B, H, K, D]` each (per-token quantized with `bits`).

    Args:
        t: SLERP weight toward layer b.
        retain: fraction of each merged block retained unmerged (most distinct pairs).
        block: tokens merged at a time (retention is chosen within each block).
        storage: the cache's `StorageSpec` (bits, group_size).
    """

    state_names = ("directions", "norms", "key_index", "value_index", "retained_a", "retained_b")

    def __init__(self, t: float = 0.6, retain: float = 0.05, block: int = 64, storage: StorageSpec | None = None):
        self.t, self.retain, self.block = t, retain, block
        spec = storage or StorageSpec()
        self.direction_spec = StorageSpec(spec.bits, spec.group_size, 0, "channel")
        self.retained_spec = StorageSpec(spec.bits, spec.group_size, 0, "token")
        self.clear()

    def clear(self) -> None:
        self.directions = self.direction_spec.new()
        self.retained_a, self.retained_b = self.retained_spec.new(), self.retained_spec.new()
        self.norms = self.key_index = self.value_index = None

    @property
    def length(self) -> int:
        """Merged tokens T."""
        return 0 if self.norms is None else self.norms.shape[2]

    def merge(self, keys_a, values_a, keys_b, values_b) -> None:
        """Merge `[B, H, n, D]` states of both layers (n a multiple of `block`), appended after the T merged ones."""
        dtype, n = keys_a.dtype, keys_a.shape[2]
        uk_a, nk_a = unit(keys_a)
        uk_b, nk_b = unit(keys_b)
        uv_a, nv_a = unit(values_a)
        uv_b, nv_b = unit(values_b)
        key_dir, key_dist = slerp(uk_a, uk_b, self.t)  # (B, H, n, D), (B, H, n)
        value_dir, value_dist = slerp(uv_a, uv_b, self.t)
        self.directions.append(key_dir.to(dtype), value_dir.to(dtype))
        self.directions.flush()
        norms = torch.stack([nk_a, nk_b, nv_a, nv_b], dim=-1).to(dtype)  # (B, H, n, 4)
        self.norms = norms if self.norms is None else torch.cat([self.norms, norms], dim=2)
        keep = retained_per_block(self.retain, self.block)
        if keep == 0:
            return
        key_idx = most_distinct(key_dist, keep, self.block)  # (B, H, K_new), into the n new tokens
        value_idx = most_distinct(value_dist, keep, self.block)
        for store, keys, values in ((self.retained_a, keys_a, values_a), (self.retained_b, keys_b, values_b)):
            store.append(_gather(keys, key_idx), _gather(values, value_idx))
            store.flush()
        offset = self.length - n
        key_idx, value_idx = (key_idx + offset).to(torch.int32), (value_idx + offset).to(torch.int32)
        self.key_index = key_idx if self.key_index is None else torch.cat([self.key_index, key_idx], dim=2)
        self.value_index = value_idx if self.value_index is None else torch.cat([self.value_index, value_idx], dim=2)

    def restore(self, member: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `member`'s (0: a, 1: b) merged tokens in full precision, `[B, H, T, D]` each (transient)."""
        key_dir, value_dir = self.directions.read()
        keys = key_dir * self.norms[..., member, None]
        values = value_dir * self.norms[..., 2 + member, None]
        if self.key_index is not None:
            kept_keys, kept_values = (self.retained_a if member == 0 else self.retained_b).read()
            keys = keys.scatter(2, _expand(self.key_index, keys.shape[-1]), kept_keys.to(keys.dtype))
            values = values.scatter(2, _expand(self.value_index, values.shape[-1]), kept_values.to(values.dtype))
        return keys, values


def _expand(index: torch.Tensor, dim: int) -> torch.Tensor:
    return index.long().unsqueeze(-1).expand(-1, -1, -1, dim)


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x[b, h, index[b, h, k]]`: `[B, H, K, D]`."""
    return x.gather(2, _expand(index, x.shape[-1]))
