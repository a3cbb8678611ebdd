"""`PackedKV`: the decode seam, a read-only view of one layer's packed KIVI storage.

Every storage that decodes through the kernels (`storage.QuantizedKV`, the static storage, the evicting storage)
produces one with `packed()`; every decode implementation (the torch reference, the sdpa path, the Triton launcher)
takes `(query, packed, kv_start, scaling, softcap)`. Nothing else crosses the seam.

Layout of the history tensors (None while the history is empty), `B` rows, `H` KV heads, `T` history tokens (or a
capacity, with `lengths`), `D` head_dim, `G` group_size; dequantization is `x = code * scale + zero`:
- `key_codes` uint8: packed per `key_layout` (see docs/kernels.md); `key_scale` / `key_zero` `[B, H, T/G, D]` for
  `key_mode == "channel"` (KIVI per-channel keys) or `[B, H, T, D/G]` for `"token"`.
- `value_codes` uint8: packed per `value_layout` (`CHANNEL_PACKED` `[B, H, T, D*bits/8]`, or `TOKEN_PACKED`
  `[B, H, D, P]`, P a multiple of 16 with P * 8/bits >= T: kernels/layouts.py);
  `value_scale` / `value_zero` `[B, H, T, D/G]`.
- `residual_keys` / `residual_values` `[B, H, R, D]` in the query's dtype (the full-precision recent window), or None.
- `lengths`: None, or an int `(2,)` tensor `(T_valid, R_valid)` on the device (static capacity buffers: only the
  first T_valid history and R_valid residual tokens are read; nothing on the host depends on them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHANNEL_PACKED = "channel"  # `[B, H, T, D * bits / 8]`: consecutive channels of one token per byte, low bits first
TOKEN_PACKED = "token"  # `[B, H, D, P]`: consecutive tokens of one channel per byte, P % 16 == 0 (kernels/layouts.py)
KEY_MODES = ("channel", "token")


@dataclass(frozen=True)
class PackedKV:
    """One layer's packed KV storage as the decode implementations read it (see the module docstring)."""

    key_codes: torch.Tensor | None
    key_scale: torch.Tensor | None
    key_zero: torch.Tensor | None
    value_codes: torch.Tensor | None
    value_scale: torch.Tensor | None
    value_zero: torch.Tensor | None
    residual_keys: torch.Tensor | None
    residual_values: torch.Tensor | None
    bits: int
    group_size: int
    key_mode: str = "channel"
    lengths: torch.Tensor | None = None
    key_layout: str = CHANNEL_PACKED
    value_layout: str = CHANNEL_PACKED

    @property
    def history_capacity(self) -> int:
        """History tokens the tensors hold (T, or T_cap in valid-length mode)."""
        return 0 if self.value_scale is None else self.value_scale.shape[2]

    @property
    def residual_capacity(self) -> int:
        """Residual tokens the tensors hold (R, or R_cap in valid-length mode)."""
        return 0 if self.residual_keys is None else self.residual_keys.shape[2]

    @property
    def key_per_channel(self) -> bool:
        return self.key_mode == "channel"


__all__ = ["CHANNEL_PACKED", "KEY_MODES", "PackedKV", "TOKEN_PACKED"]
