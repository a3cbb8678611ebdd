"""`StaticQuantizedKV`: KIVI storage preallocated for `max_cache_len` tokens and written in place (CUDA-graph safe).

Same layout and the same quantization schedule as `kvpress_lite.storage.QuantizedKV` (per-channel keys, per-token
values, a full-precision residual of `residual_length` to `residual_length + group_size - 1` recent tokens, blocks of
`group_size` quantized once when they leave it), but every tensor has a fixed shape and address:

- history `key_codes` uint8 `[B, H, T_cap, D * bits / 8]`, `value_codes` uint8 token-packed `[B, H, D,
  packed_columns(T_cap, bits)]` (the layout the decode kernel reads, kernels/layouts.py; channel-packed `[B, H, T_cap,
  D * bits / 8]` only when G is not a multiple of 8 / bits, so that a block of G tokens at a multiple of G is whole
  bytes), `key_scale`/`key_zero` `[B, H, T_cap / G, D]`, `value_scale`/`value_zero` `[B, H, T_cap, D / G]`, with
  `T_cap = ceil(max_cache_len / G) * G + G`;
- residual `keys`/`values` `[B, H, R_cap, D]`, `R_cap = residual_length + group_size - 1 + MAX_STEP`;
- `lengths` int32 `[2]` = (T, R): valid history and residual tokens. Slots past them are garbage, never read.

Two ways to write:
- `append_host` (any number of tokens; reads `lengths` on the host): the prompt, and forwards that do not decode
  through the fused kernel. It returns the full-precision keys/values attention reads (exactly what `QuantizedKV`
  returns) and flushes like `QuantizedKV.flush`.
- `flush_step` + `append_step` (at most `MAX_STEP` tokens, no host sync, no data-dependent Python): a decode step
  under `torch.compile` / CUDA graphs. `flush_step` runs at the start of a step, before the new tokens: it quantizes
  the oldest `group_size` residual tokens every step and writes them at history slot T; only when the residual is full
  (R >= residual_length + group_size, left so by the previous step's attention) are they kept (T grows by G and the
  residual shifts left by G). Otherwise the block lands past the valid history and is overwritten by the next real
  flush. Flushing before rather than after the step's attention computes the same tensors as `QuantizedKV` (which
  flushes right after attention), and leaves the attention as the last reader of every buffer, so inductor writes them
  in place (with the flush after it, it copied the whole history every step to keep the attention's input intact).
  Per step that costs quantizing one block and moving one residual buffer: a few KB per layer and row, against the
  whole history the attention reads.
"""

from __future__ import annotations

import torch

from .. import _compat
from ..kernels.layouts import packed_columns, unpack_tokens, write_tokens
from ..kernels.packed import CHANNEL_PACKED, TOKEN_PACKED, PackedKV
from ..kivi import dequantize_keys, dequantize_values, pack, quantize_keys, quantize_values
from ..layer_state import MAX_STEP, check_fits


class StaticQuantizedKV:
    """Preallocated KIVI storage of one layer; see the module docstring.

    Args:
        bits: 8, 4 or 2. group_size: G (tokens per key group, channels per value group).
        residual_length: most recent tokens kept in full precision.
        max_cache_len: tokens the storage can hold (prompt + generated).
    """

    state_names = ("keys", "values", "key_codes", "key_scale", "key_zero", "value_codes", "value_scale", "value_zero")
    key_mode = "channel"

    def __init__(self, bits: int, group_size: int, residual_length: int, max_cache_len: int):
        self._bits, self._group_size = str(int(bits)), str(int(group_size))  # see `bits`
        self.residual_length = residual_length
        self.max_cache_len = max_cache_len
        self.history_capacity = -(-max_cache_len // group_size) * group_size + group_size  # + one scratch block
        self.residual_capacity = residual_length + group_size - 1 + MAX_STEP
        self.lengths = None  # int32 [2]: (T, R)
        for name in self.state_names:
            setattr(self, name, None)

    # `bits` and `group_size` must be compile-time constants of a compiled step (shifts, packing loops and views
    # depend on them). A plain int attribute whose value differs between two compiles of one forward (int4, then
    # int8: the same source `cache.layers[i].store.bits`) is made symbolic by dynamo's automatic dynamic shapes on the
    # recompile, and torch 2.11 then fails on `1 << bits` (torch 2.13 specializes it again at `bits == 8`). Strings
    # are always specialized (guarded by value), so both are stored as strings and parsed here.
    @property
    def bits(self) -> int:
        return int(self._bits)

    @property
    def group_size(self) -> int:
        return int(self._group_size)

    @property
    def value_layout(self) -> str:
        """TOKEN_PACKED when a block of G tokens is whole bytes (G a multiple of 8 / bits), else CHANNEL_PACKED."""
        return TOKEN_PACKED if self.group_size % (8 // self.bits) == 0 else CHANNEL_PACKED

    # ------------------------------------------------------------------ allocation
    @property
    def allocated(self) -> bool:
        return self.lengths is not None

    def allocate(self, like: torch.Tensor) -> None:
        """Allocate every buffer for `like`'s batch, heads, head_dim, dtype and device `[B, H, *, D]` (zeros)."""
        b, h, _, d = like.shape
        g, dev, dt = self.group_size, like.device, like.dtype
        tc, rc, db = self.history_capacity, self.residual_capacity, d * self.bits // 8
        self.key_codes = torch.zeros(b, h, tc, db, dtype=torch.uint8, device=dev)
        if self.value_layout == TOKEN_PACKED:  # (B, H, D, P): tokens packed per channel
            self.value_codes = torch.zeros(b, h, d, packed_columns(tc, self.bits), dtype=torch.uint8, device=dev)
        else:
            self.value_codes = torch.zeros(b, h, tc, db, dtype=torch.uint8, device=dev)
        self.key_scale = torch.zeros(b, h, tc // g, d, dtype=dt, device=dev)
        self.key_zero = torch.zeros(b, h, tc // g, d, dtype=dt, device=dev)
        self.value_scale = torch.zeros(b, h, tc, d // g, dtype=dt, device=dev)
        self.value_zero = torch.zeros(b, h, tc, d // g, dtype=dt, device=dev)
        self.keys = torch.zeros(b, h, rc, d, dtype=dt, device=dev)
        self.values = torch.zeros(b, h, rc, d, dtype=dt, device=dev)
        self.lengths = torch.zeros(2, dtype=torch.int32, device=dev)
        for name in (*self.state_names, "lengths"):
            _compat.mark_static_address(getattr(self, name))

    def check_input(self, keys: torch.Tensor) -> None:
        """ValueError if `keys` `[B, H, q, D]` do not fit the allocated buffers (another batch size, dtype, device)."""
        check_fits(self.keys, keys)

    @property
    def quantized_length(self) -> int:
        """Tokens held in the quantized history (T; read on the host, a device sync on CUDA)."""
        return self.host_lengths()[0] if self.allocated else 0

    def packed(self) -> PackedKV:
        """The decode seam's view: every buffer at its capacity, the valid lengths on the device (`lengths`)."""
        return PackedKV.view(self.key_codes, self.key_scale, self.key_zero, self.value_codes, self.value_scale,
                             self.value_zero, self.keys, self.values, self.bits, self.group_size, self.key_mode,
                             self.lengths, value_layout=self.value_layout)

    # ------------------------------------------------------------------ host path
    def host_lengths(self) -> tuple[int, int]:
        """(T, R) read on the host (a device sync on CUDA)."""
        t, r = self.lengths.tolist()
        return int(t), int(r)

    def append_host(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append `[B, H, q, D]` states; return all `[B, H, T + R + q, D]` keys/values (history dequantized, a new
        tensor) as `QuantizedKV.read` would, then quantize what `QuantizedKV.flush` would, in place."""
        t, r = self.host_lengths()
        q = keys.shape[-2]
        if t + r + q > self.max_cache_len:
            raise ValueError(
                f"max_cache_len={self.max_cache_len} exceeded: the cache holds {t + r} tokens and got {q} more "
                f"({t + r + q} in all); build the cache with max_cache_len >= prompt length + max_new_tokens"
            )
        fresh_k = torch.cat([self.keys[:, :, :r], keys], dim=-2) if r else keys
        fresh_v = torch.cat([self.values[:, :, :r], values], dim=-2) if r else values
        if t:
            hist_k, hist_v = self.dequantized_history(t)
            out = torch.cat([hist_k, fresh_k], dim=-2), torch.cat([hist_v, fresh_v], dim=-2)
        else:
            out = fresh_k, fresh_v
        excess = r + q - self.residual_length
        n = (excess // self.group_size) * self.group_size if excess >= self.group_size else 0
        if n:
            self._write_history(t, fresh_k[:, :, :n], fresh_v[:, :, :n])
        rest = r + q - n
        if rest > self.residual_capacity:  # cannot happen: rest < residual_length + group_size
            raise RuntimeError(f"residual overflow ({rest} > {self.residual_capacity})")
        if n or not r:  # the residual's content moved (or starts): rewrite it
            self.keys[:, :, :rest] = fresh_k[:, :, n:]
            self.values[:, :, :rest] = fresh_v[:, :, n:]
        else:  # the old residual stays in place, the new tokens follow it
            self.keys[:, :, r:rest] = keys
            self.values[:, :, r:rest] = values
        self.lengths.copy_(torch.tensor([t + n, rest], dtype=torch.int32))
        return out

    def _write_history(self, t: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Quantize `[B, H, n, D]` full-precision tokens (n a multiple of G) into history slots t .. t + n."""
        n, g = keys.shape[-2], self.group_size
        token = self.value_layout == TOKEN_PACKED
        kc, ks, kz = quantize_keys(keys, self.bits, g)
        vc, vs, vz = quantize_values(values, self.bits, g, pack_codes=not token)
        self.key_codes[:, :, t : t + n] = kc
        self.key_scale[:, :, t // g : (t + n) // g] = ks
        self.key_zero[:, :, t // g : (t + n) // g] = kz
        if token:
            write_tokens(self.value_codes, t, vc, self.bits)
        else:
            self.value_codes[:, :, t : t + n] = vc
        self.value_scale[:, :, t : t + n] = vs
        self.value_zero[:, :, t : t + n] = vz

    def dequantized_history(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-precision copy of the first `t` history tokens, `[B, H, t, D]` each."""
        g = self.group_size
        keys = dequantize_keys(self.key_codes[:, :, :t], self.key_scale[:, :, : t // g], self.key_zero[:, :, : t // g],
                               self.bits, g)
        if self.value_layout == TOKEN_PACKED:  # unpacked codes (B, H, t, D): the 8-bit dequantizer reads them as is
            codes, bits = unpack_tokens(self.value_codes, self.bits, t), 8
        else:
            codes, bits = self.value_codes[:, :, :t], self.bits
        values = dequantize_values(codes, self.value_scale[:, :, :t], self.value_zero[:, :, :t], bits, g)
        return keys, values

    # ------------------------------------------------------------------ compiled decode step
    def append_step(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write `q <= MAX_STEP` new tokens `[B, H, q, D]` at residual slots R .. R + q, in place, no host sync.

        Overflow of `max_cache_len` fails an asynchronous device assertion naming it (a device-side assert on CUDA)."""
        q = keys.shape[-2]
        lengths = self.lengths
        total = lengths[0] + lengths[1] + q
        torch._assert_async(total <= self.max_cache_len,
                            f"max_cache_len={self.max_cache_len} exceeded; build the cache with max_cache_len >= "
                            "prompt length + max_new_tokens")
        slots = lengths[1].long() + torch.arange(q, device=keys.device)
        self.keys.index_copy_(2, slots, keys)
        self.values.index_copy_(2, slots, values)
        lengths[1:].add_(q)

    def flush_step(self) -> None:
        """Branch-free flush at the start of a decode step (see the module docstring)."""
        g, lengths = self.group_size, self.lengths
        t = lengths[0].long()
        due = lengths[1] >= self.residual_length + g  # 0-dim bool
        token = self.value_layout == TOKEN_PACKED
        kc, ks, kz = quantize_keys(self.keys[:, :, :g], self.bits, g)
        vc, vs, vz = quantize_values(self.values[:, :, :g], self.bits, g, pack_codes=not token)
        slots = t + torch.arange(g, device=t.device)
        block = (t // g).reshape(1)
        self.key_codes.index_copy_(2, slots, kc)
        if token:  # G tokens at t (a multiple of G, so of 8 / bits): whole byte columns t*bits/8 .. (t+G)*bits/8
            per_byte = 8 // self.bits
            columns = t // per_byte + torch.arange(g // per_byte, device=t.device)
            self.value_codes.index_copy_(3, columns, pack(vc.transpose(2, 3).contiguous(), self.bits))  # (B,H,D,G/PB)
        else:
            self.value_codes.index_copy_(2, slots, vc)
        self.value_scale.index_copy_(2, slots, vs)
        self.value_zero.index_copy_(2, slots, vz)
        self.key_scale.index_copy_(2, block, ks)
        self.key_zero.index_copy_(2, block, kz)
        self.keys.copy_(torch.where(due, self.keys.roll(-g, dims=2), self.keys))
        self.values.copy_(torch.where(due, self.values.roll(-g, dims=2), self.values))
        step = due.to(torch.int32) * g
        lengths.add_(torch.stack([step, -step]))

    def reorder(self, index: torch.Tensor) -> None:
        """Reorder the batch in place (beam search), keeping every buffer's address."""
        for name in self.state_names:
            tensor = getattr(self, name)
            tensor.copy_(tensor.index_select(0, index.to(tensor.device)))
