"""Cross-layer KV caches: MiniCache merging, KVSharer sharing, calibrated plans (see docs/crosslayer.md)."""

from .cache import CrossLayerCache
from .calibration import calibrate
from .merge import MergedPair
from .plan import CrossLayerPlan, check_layout

__all__ = ["CrossLayerCache", "CrossLayerPlan", "MergedPair", "calibrate", "check_layout"]
