"""Preallocated storage of a fixed-slot eviction layer: `S` slots then a `W`-token full-precision ring, in place.

Layout per (row, kv head), index `j` of `[0, S + W)`: slots `j < S` hold the tokens eviction kept (any order), the ring
`S + (p % W)` holds token position `p` for the last `W` positions. Every write is an in-place `scatter_`/`index_copy_`
at indices computed on the device, so a decode step has fixed shapes, fixed addresses and no host sync.

- `SlotKV` (full precision): one `keys`/`values` buffer `[B, H, S + W, D]`; `read()` returns the buffers themselves.
- `QuantizedSlotKV` (`bits` 8 or 4): slots as KIVI codes with per-token keys and values (`kivi.quantize_values`, groups
  of `group_size` channels: codes `[B, H, S, D * bits / 8]` uint8, scale/zero `[B, H, S, D / G]` in the model dtype),
  the ring `ring_keys`/`ring_values` `[B, H, W, D]`; `read()` dequantizes the slots and appends the ring (a transient
  `[B, H, S + W, D]`, the step's only copy); `packed()` is the same storage as the decode seam reads it (slots =
  history, ring = residual), for the kernel path that reads the codes directly. Paper: KIVI,
  https://arxiv.org/abs/2402.02750
"""

from __future__ import annotations

import torch

from .. import _compat
from ..kernels.packed import PackedKV
from ..kivi import dequantize_values, quantize_values


def write_entries(buffer: torch.Tensor, index: torch.Tensor, tokens: torch.Tensor, write: torch.Tensor) -> None:
    """`buffer[b, h, index[b, h]] = tokens[b, h]` where `write[b, h]`, in place (an `index_put_`, which inductor
    writes into the buffer itself; a `scatter_` made it copy the whole buffer every step).

    buffer `[B, H, N, *X]`, index `[B, H]` int64, tokens `[B, H, *X]`, write `[B, H]` bool."""
    b, h = index.shape
    rows = torch.arange(b, device=index.device)[:, None].expand(b, h)
    heads = torch.arange(h, device=index.device)[None, :].expand(b, h)
    old = buffer[rows, heads, index]  # (B, H, *X)
    mask = write.view(b, h, *([1] * (old.dim() - 2)))
    buffer.index_put_((rows, heads, index), torch.where(mask, tokens.to(buffer.dtype), old))


class SlotKV:
    """Full-precision slots and ring in one buffer pair `keys`/`values` `[B, H, S + W, D]` (see module docstring)."""

    state_names = ("keys", "values")

    def __init__(self, slots: int, window: int):
        self.slots, self.window = slots, window
        self.keys = self.values = None

    def allocate(self, like: torch.Tensor) -> None:
        """Zeros for `like`'s batch, heads, head_dim, dtype and device `[B, H, *, D]`, marked as static addresses."""
        b, h, _, d = like.shape
        for name in self.state_names:
            setattr(self, name, torch.zeros(b, h, self.slots + self.window, d, dtype=like.dtype, device=like.device))
            _compat.mark_static_address(getattr(self, name))

    def fill(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write every entry from dense `[B, H, S + W, D]` keys and values (host path, at the end of the prompt)."""
        self.keys.copy_(keys)
        self.values.copy_(values)

    def write_slot(self, index: torch.Tensor, key: torch.Tensor, value: torch.Tensor, write: torch.Tensor) -> None:
        """Slot `index[b, h]` (< S) takes `key`/`value` `[B, H, D]` where `write[b, h]`."""
        write_entries(self.keys, index, key, write)
        write_entries(self.values, index, value, write)

    def write_ring(self, ring_index: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Ring entries `ring_index` `[n]` (int64, < W) take `keys`/`values` `[B, H, n, D]`."""
        self.keys.index_copy_(2, ring_index + self.slots, keys)
        self.values.index_copy_(2, ring_index + self.slots, values)

    def ring_token(self, ring_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value `[B, H, D]` held at ring entry `ring_index` (0-dim int64)."""
        j = (ring_index + self.slots).view(1)
        return self.keys.index_select(2, j)[:, :, 0], self.values.index_select(2, j)[:, :, 0]

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `[B, H, S + W, D]` attention reads: the buffers themselves."""
        return self.keys, self.values

    def packed(self) -> PackedKV:
        """All S + W entries as the decode seam's full-precision residual (no history), read by the Triton kernel's
        residual splits (`FixedSlotEvictionCache(bf16_kernel=True)`); `bits=8` and `group_size=D` only pick the
        residual-only launch's variant (v3: one dot over all channels per tile)."""
        d = self.keys.shape[-1]
        return PackedKV.view(None, None, None, None, None, None, self.keys, self.values, 8, d, key_mode="token")

    def reorder(self, index: torch.Tensor) -> None:
        """Reorder the batch in place (beam search), keeping every address."""
        for name in self.state_names:
            tensor = getattr(self, name)
            tensor.copy_(tensor.index_select(0, index.to(tensor.device)))


class QuantizedSlotKV(SlotKV):
    """Quantized slots (per-token keys and values, KIVI codes) and a full-precision ring (see module docstring).

    Args:
        slots: S. window: W. bits: 8 or 4. group_size: channels per scale/zero group (divides head_dim).
    """

    state_names = ("key_codes", "key_scale", "key_zero", "value_codes", "value_scale", "value_zero",
                   "ring_keys", "ring_values")

    def __init__(self, slots: int, window: int, bits: int, group_size: int):
        super().__init__(slots, window)
        self.bits, self.group_size = bits, group_size
        for name in self.state_names:
            setattr(self, name, None)

    def allocate(self, like: torch.Tensor) -> None:
        b, h, _, d = like.shape
        dev, dt, s, w = like.device, like.dtype, self.slots, self.window
        shapes = {"codes": ((b, h, s, d * self.bits // 8), torch.uint8), "scale": ((b, h, s, d // self.group_size), dt),
                  "zero": ((b, h, s, d // self.group_size), dt)}
        for side in ("key", "value"):
            for part, (shape, dtype) in shapes.items():
                setattr(self, f"{side}_{part}", torch.zeros(shape, dtype=dtype, device=dev))
        self.ring_keys = torch.zeros(b, h, w, d, dtype=dt, device=dev)
        self.ring_values = torch.zeros(b, h, w, d, dtype=dt, device=dev)
        for name in self.state_names:
            _compat.mark_static_address(getattr(self, name))

    def _codes(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The six quantized tensors of `[B, H, n, D]` keys and values (per-token groups of `group_size` channels)."""
        bits, g = self.bits, self.group_size
        return (*quantize_values(keys, bits, g), *quantize_values(values, bits, g))

    def fill(self, keys, values):
        s = self.slots
        for name, part in zip(self.state_names[:6], self._codes(keys[:, :, :s], values[:, :, :s])):
            getattr(self, name).copy_(part)
        self.ring_keys.copy_(keys[:, :, s:])
        self.ring_values.copy_(values[:, :, s:])

    def write_slot(self, index, key, value, write):
        parts = self._codes(key[:, :, None], value[:, :, None])  # each (B, H, 1, X)
        for name, part in zip(self.state_names[:6], parts):
            write_entries(getattr(self, name), index, part[:, :, 0], write)

    def write_ring(self, ring_index, keys, values):
        self.ring_keys.index_copy_(2, ring_index, keys)
        self.ring_values.index_copy_(2, ring_index, values)

    def ring_token(self, ring_index):
        j = ring_index.view(1)
        return self.ring_keys.index_select(2, j)[:, :, 0], self.ring_values.index_select(2, j)[:, :, 0]

    def packed(self) -> PackedKV:
        """The slots as the decode seam's history (per-token keys, channel-packed codes: `key_mode="token"`) and the
        ring as its full-precision residual: entry j of `[0, S + W)` is index j of `positions` / the probabilities."""
        return PackedKV.view(self.key_codes, self.key_scale, self.key_zero, self.value_codes, self.value_scale,
                             self.value_zero, self.ring_keys, self.ring_values, self.bits, self.group_size,
                             key_mode="token")

    def read(self):
        """Dequantized slots then the ring: `[B, H, S + W, D]` each (transient)."""
        keys = dequantize_values(self.key_codes, self.key_scale, self.key_zero, self.bits, self.group_size)
        values = dequantize_values(self.value_codes, self.value_scale, self.value_zero, self.bits, self.group_size)
        return torch.cat([keys, self.ring_keys], dim=2), torch.cat([values, self.ring_values], dim=2)
