"""Plans computed by `kvpress_lite.crosslayer.calibrate` for the embedded models (see docs/crosslayer.md)."""

SHIPPED_PLANS: dict[str, dict] = {}
