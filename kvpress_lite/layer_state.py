"""Shared batch bookkeeping for cache layers whose state is several tensors with batch as dim 0."""

from __future__ import annotations

import torch


class BatchStateMixin:
    """Applies beam/batch operations to every attribute named in `state_names`: batch-first tensors (may be None)
    and nested `BatchStateMixin` objects (e.g. a layer's `storage.KVStorage`), which map their own state."""

    state_names: tuple[str, ...] = ()

    def _map_state(self, fn) -> None:
        for name in self.state_names:
            value = getattr(self, name, None)
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                setattr(self, name, fn(value))
            elif isinstance(value, BatchStateMixin):
                value._map_state(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder every state tensor along batch for beam search."""
        self._map_state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every state tensor `repeats` times along batch."""
        self._map_state(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only `indices` along batch."""
        self._map_state(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def offload(self) -> None:
        """Move state to CPU."""
        self._map_state(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        """Move state back to the layer's device."""
        self._map_state(lambda t: t.to(self.device, non_blocking=True))
