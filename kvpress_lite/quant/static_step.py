"""What every layer of `StaticQuantizedKVCache` shares: the step-path rule and the fixed-shape refusals."""

from __future__ import annotations

from .static_storage import MAX_STEP


class StaticStepMixin:
    """For static layers with `attachment` (the cache's attention-bridge attachment, or None) and `_bridge_seen` (a
    host-path forward of this layer reached `attend` through the bridge)."""

    attachment = None
    _bridge_seen = False

    @property
    def fused(self) -> bool:
        return self.attachment is not None and self.attachment.active

    def _steps(self, q: int) -> bool:
        """True if a forward of `q` tokens takes the step path (no host sync, in-place writes, bridged attention)."""
        return self.fused and q <= MAX_STEP and self._bridge_seen

    def _fixed_batch(self, *args, **kwargs) -> None:
        raise ValueError("StaticQuantizedKVCache has a fixed batch size (its buffers are preallocated); decoding "
                         "strategies that change the batch (contrastive search, batch selection) are not supported")

    batch_repeat_interleave = batch_select_indices = _fixed_batch

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("StaticQuantizedKVCache cannot be cropped (assisted generation); use QuantizedKVCache")

    def offload(self) -> None:
        raise ValueError("StaticQuantizedKVCache cannot be offloaded; use QuantizedKVCache")

    prefetch = offload
