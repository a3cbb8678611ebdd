"""`CrossLayerCache`: layers that merge (MiniCache) or share (KVSharer) their KV, optionally quantized."""

from __future__ import annotations

from ..cache import CompressedCache, ModelGeometry
from ..registry import register
from ..storage import StorageSpec
from .layers import MergedLayer, StoredLayer
from .merge import MergedPair
from .plan import check_layout, default_pairs, resolve_plan
from .share import SharedLayer

MODES = ("merge", "share")
DEFAULT_START = 0.5  # fraction of depth where default pairs begin (MiniCache merges from mid-depth)


def _fraction(name: str, value, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name}={value!r} must be a number in [{low}, {high}]")


class CrossLayerCache(CompressedCache):
    """A KV cache whose layers merge in pairs (MiniCache) or share another layer's KV (KVSharer), post hoc.

    Example: `model.generate(**inputs, cache=CrossLayerCache(model, bits=4))`.

    - `mode="merge"` (default): each pair (a, b) of `pairs` stores one unit direction per token for keys and for
      values (SLERP of the two layers' directions at weight `t`), each layer's magnitude, and the `retain` fraction of
      most distinct tokens unmerged (arXiv 2405.14366). Tokens merge as they leave a `window`-token full-precision
      recent window, `block` tokens at a time, during prefill and decoding.
    - `mode="share"`: each consumer of `share` ({consumer: producer}, producer earlier) stores nothing and reads the
      producer's KV (arXiv 2410.18517).
    - `plan=`: merges and shares together, from `kvpress_lite.crosslayer.calibrate` (a `CrossLayerPlan`, its dict, a
      .json/.yaml path, or a shipped plan's name such as "smollm2-135m").
    Only full-attention layers take part: on hybrid models (Gemma 3) sliding layers use another RoPE base and keep
    transformers' window; other layers store their own KV (quantized if `bits`).

    Args:
        model_or_config: the model (or its config) the cache will run with.
        mode: "merge" or "share": what the default layout does when `pairs` / `share` are not given.
        start: first layer of the default layout (default: half the depth); merge pairs and share pairs are
            (start, start+1), (start+2, start+3)... of the full-attention layers (share: the second reads the first).
        pairs: merge pairs [[a, b], ...], a < b, full-attention layers.
        share: {consumer: producer}.
        plan: a calibrated plan (replaces mode/start/pairs/share).
        t: SLERP weight toward the pair's second layer, in [0, 1] (paper: 0.6).
        retain: fraction of each merged block kept unmerged, in [0, 1].
        window: most recent tokens kept unmerged in full precision (>= 0).
        block: tokens merged at a time (>= 1).
        bits / group_size / residual_length: storage of everything kept (`storage.StorageSpec`): None (full
            precision) or 8/4/2 bits; merged directions and retained tokens are quantized with no window of their own,
            unmerged layers keep a `residual_length` recent window in full precision.
    Storage per merged pair: directions `[B, H, T, D]` x2, norms `[B, H, T, 4]`, retained `[B, H, K, D]` x4 + indices.
    """

    def __init__(
        self,
        model_or_config,
        mode: str = "merge",
        start: int | None = None,
        pairs=None,
        share=None,
        plan=None,
        t: float = 0.6,
        retain: float = 0.05,
        window: int = 32,
        block: int = 64,
        sinks: int = 4,
        bits: int | None = None,
        group_size: int = 64,
        residual_length: int = 128,
    ):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not supported; accepted values: {list(MODES)}")
        _fraction("t", t, 0.0, 1.0)
        _fraction("retain", retain, 0.0, 1.0)
        for name, value, minimum in (("window", window, 0), ("block", block, 1), ("sinks", sinks, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
        self.storage = StorageSpec(bits, group_size, residual_length, "channel")
        geometry = ModelGeometry.of(model_or_config)
        self.storage.check_head_dim(geometry.head_dim)
        if plan is not None:
            if pairs is not None or share is not None or start is not None:
                raise ValueError("give either plan= or start/pairs/share, not both (a plan sets the layout)")
            self.plan = resolve_plan(plan)
            self.pairs, self.share = self.plan.check(geometry)
        else:
            if start is not None and (
                isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < geometry.num_layers
            ):
                raise ValueError(f"start={start!r} must be a layer index in [0, {geometry.num_layers - 1}]")
            first = int(geometry.num_layers * DEFAULT_START) if start is None else start
            layout = default_pairs(geometry, first)
            if pairs is None and share is None:  # the default layout, merged or shared
                pairs, share = (layout, None) if mode == "merge" else (None, {b: a for a, b in layout})
            self.plan = None
            self.pairs, self.share = check_layout(pairs, share, geometry)
        self.mode, self.t, self.retain, self.window, self.block, self.sinks = mode, t, retain, window, block, sinks
        self.bits, self.group_size, self.residual_length = bits, group_size, residual_length
        self._first = {a: b for a, b in self.pairs}
        self._second = {b: a for a, b in self.pairs}
        self._built = {}
        super().__init__(model_or_config)
        del self._built

    def full_attention_layer(self, layer_idx: int):
        if layer_idx in self.share:  # producers are earlier layers, built before
            layer = SharedLayer(layer_idx, self._built[self.share[layer_idx]])
        elif layer_idx in self._first:
            pair = MergedPair(self.t, self.retain, self.block, self.storage)
            layer = MergedLayer(layer_idx, pair, None, self.window, self.sinks)
        elif layer_idx in self._second:
            first = self._built[self._second[layer_idx]]
            layer = MergedLayer(layer_idx, first.pair, first, self.window, self.sinks)
        else:
            layer = StoredLayer(layer_idx, self.storage)
        self._built[layer_idx] = layer
        return layer

    def describe(self) -> str:
        """One line: which layers merge and which share."""
        return f"merge {[list(p) for p in self.pairs]}, share {self.share}"


register(
    "crosslayer",
    "cross-layer",
    "MiniCache-merged layer pairs / KVSharer shared layers / a calibrated plan, optionally quantized",
)(CrossLayerCache)
