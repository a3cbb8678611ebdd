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


MAX_STEP = 16  # tokens a compiled decode step may append (the decode kernels' query limit)


def check_fits(buffer: torch.Tensor, keys: torch.Tensor) -> None:
    """ValueError if new `keys` `[B, H, q, D]` cannot be written into a preallocated `buffer` `[B, H, *, D]` (another
    batch size, dtype or device)."""
    b = buffer.shape[0]
    if keys.shape[0] != b or keys.dtype != buffer.dtype or keys.device != buffer.device:
        raise ValueError(
            f"the static cache was allocated for batch {b} in {buffer.dtype} on {buffer.device}, got keys of batch "
            f"{keys.shape[0]} in {keys.dtype} on {keys.device}; build a new cache (or call reset() and keep the batch "
            "size)"
        )


class FixedShapeLayerMixin:
    """For preallocated layers of `StaticQuantizedKVCache` (quantized and sliding) that also use
    `attention_bridge.BridgedLayerMixin`: the step-path rule and the refusals of what fixed shapes cannot do.
    `attachment`: the cache's attention-bridge attachment, or None."""

    attachment = None

    @property
    def fused(self) -> bool:
        return self.attachment is not None and self.attachment.active

    def _steps(self, q: int) -> bool:
        """True if a forward of `q` tokens takes the step path (no host sync, in-place writes, bridged attention)."""
        return self.fused and q <= MAX_STEP and self.bridge_seen

    def _fixed_batch(self, *args, **kwargs) -> None:
        raise ValueError("StaticQuantizedKVCache has a fixed batch size (its buffers are preallocated); decoding "
                         "strategies that change the batch (contrastive search, batch selection) are not supported")

    batch_repeat_interleave = batch_select_indices = _fixed_batch

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("StaticQuantizedKVCache cannot be cropped (assisted generation); use QuantizedKVCache")

    def offload(self) -> None:
        raise ValueError("StaticQuantizedKVCache cannot be offloaded; use QuantizedKVCache")

    prefetch = offload
