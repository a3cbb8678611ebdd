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

    @classmethod
    def view(cls, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, residual_keys, residual_values,
             bits: int, group_size: int, key_mode: str = "channel", lengths=None, key_layout: str = CHANNEL_PACKED,
             value_layout: str = CHANNEL_PACKED) -> PackedKV:
        """The same object as `PackedKV(...)`, built without the frozen dataclass's per-field `object.__setattr__`
        (~4 us -> ~1 us): storages build one per layer and decode step, and eager decoding is host-bound. Traced by
        torch.compile, the plain constructor: dynamo (torch 2.11) cannot trace `__dict__.update` on a frozen dataclass
        and broke the compiled fixed-slot int4 step there, into four graphs per layer."""
        if torch.compiler.is_compiling():
            return cls(key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, residual_keys,
                       residual_values, bits, group_size, key_mode, lengths, key_layout, value_layout)
        packed = object.__new__(cls)
        packed.__dict__.update(
            key_codes=key_codes, key_scale=key_scale, key_zero=key_zero, value_codes=value_codes,
            value_scale=value_scale, value_zero=value_zero, residual_keys=residual_keys,
            residual_values=residual_values, bits=bits, group_size=group_size, key_mode=key_mode, lengths=lengths,
            key_layout=key_layout, value_layout=value_layout)
        return packed

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

    @property
    def has_history(self) -> bool:
        return self.key_codes is not None and self.key_codes.shape[2] > 0

    @property
    def has_residual(self) -> bool:
        return self.residual_keys is not None and self.residual_keys.shape[2] > 0

    @property
    def kv_heads(self) -> int:
        return (self.key_codes if self.has_history else self.residual_keys).shape[1]

    def valid_lengths(self) -> tuple[int, int]:
        """(T, R) tokens to read: the capacities, or `lengths` (read on the host: a device sync) clamped to them."""
        t_cap, r_cap = self.history_capacity, self.residual_capacity
        if self.lengths is None:
            return t_cap, r_cap
        lt, lr = (int(x) for x in self.lengths.tolist())
        return min(max(lt, 0), t_cap), min(max(lr, 0), r_cap)

    # ------------------------------------------------------------------ crossing torch.library (no dataclasses there)
    def tensors(self) -> tuple:
        """The nine tensor fields in the order `from_parts` takes them (history, residual, lengths)."""
        return (self.key_codes, self.key_scale, self.key_zero, self.value_codes, self.value_scale, self.value_zero,
                self.residual_keys, self.residual_values, self.lengths)

    def statics(self) -> tuple:
        """The non-tensor fields, in the order `from_parts` takes them."""
        return (int(self.bits), int(self.group_size), self.key_mode, self.key_layout, self.value_layout)

    @classmethod
    def from_parts(cls, tensors, statics) -> PackedKV:
        """Inverse of (`tensors()`, `statics()`)."""
        *hist_res, lengths = tensors
        bits, group_size, key_mode, key_layout, value_layout = statics
        return cls(*hist_res, bits=bits, group_size=group_size, key_mode=key_mode, lengths=lengths,
                   key_layout=key_layout, value_layout=value_layout)


__all__ = ["CHANNEL_PACKED", "KEY_MODES", "PackedKV", "TOKEN_PACKED"]
