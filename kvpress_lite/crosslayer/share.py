"""KVSharer-style sharing (arXiv 2410.18517): a consumer layer stores nothing and attends to a producer's KV.

The producer is an earlier layer (it has updated in the current forward before the consumer asks), so the consumer's
attention reads the producer's keys and values, this forward's tokens included. Keys arrive rotated (RoPE), so only
layers with the same rotation (same layer type on hybrid models) can share.
"""

from __future__ import annotations

from .layers import CrossLayer


class SharedLayer(CrossLayer):
    """A consumer layer: no state of its own (`state_names` is empty, so beam search reorders the producer once).

    Args:
        layer_idx: the consumer's model layer.
        producer: the earlier layer (`StoredLayer` or `MergedLayer`) whose KV it reads.
    """

    state_names = ()

    def __init__(self, layer_idx: int, producer: CrossLayer):
        self.producer = producer
        super().__init__(layer_idx)

    def _update(self, key_states, value_states):
        if self.producer.length != self.length:
            raise ValueError(
                f"layer {self.layer_idx} shares layer {self.producer.layer_idx}'s KV, which holds "
                f"{self.producer.length} tokens instead of {self.length}: the producer must update first in each "
                "forward"
            )
        return self.read()  # this layer's own key/value states are dropped

    def read(self):
        return self.producer.read()
