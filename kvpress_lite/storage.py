"""One layer's KV storage, full precision or quantized: the seam every cache family builds on.

A storage holds `P` slots of keys and values per (batch row, kv head), in slot order, and offers what the families
need: `append` new tokens, `read` what attention reads (a transient full-precision copy for quantized storage),
`keep` a chosen subset of slots per (row, head) (eviction), batch reorder/select (beam search) through
`BatchStateMixin`, `truncate` (crop) and resident bytes (`cache_nbytes` walks its tensors).

`QuantizedKV` uses the KIVI layout (arXiv 2402.02750, docs/design/quantization.md): a history of quantized tokens
followed by a full-precision residual window of the most recent tokens. Keys are quantized either per channel over
groups of `group_size` tokens (`key_mode="channel"`, KIVI; best quality, but a group of tokens shares a scale, so
dropping single tokens breaks groups) or per token over groups of `group_size` channels (`key_mode="token"`, like
the values; every slot decodes on its own, so eviction is a plain gather of codes, scales and zeros).
Evicting caches use `"token"` keys: see docs/composition.md for the choice and its measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels.layouts import append_tokens, gather_tokens, unpack_tokens
from .kernels.packed import TOKEN_PACKED, PackedKV
from .kivi import SUPPORTED_BITS, dequantize_keys, dequantize_values, quantize_keys, quantize_values
from .layer_state import BatchStateMixin

KEY_MODES = ("channel", "token")
TOKEN_FLUSH_BLOCK = 8  # per-token keys: residual tokens are quantized in blocks of 8 (amortizes the history concat)
VALUE_CODES = 3  # index of the value codes in `QuantizedKV._history()` (token-packed: appended and gathered apart)


def _positive_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def gather_slots(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`tensor[b, h, index[b, h, k], :]`: `[B, H, P, X]` -> `[B, H, K, X]` in new storage (the old buffer is freed)."""
    return tensor.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, tensor.shape[-1]))


@dataclass(frozen=True)
class StorageSpec:
    """How a cache stores each compressed layer's keys and values.

    Args:
        bits: None (full precision, the model's dtype) or 8, 4, 2 (KIVI codes, int4/int2 packed into bytes).
        group_size: tokens per key group (`key_mode="channel"`), channels per value group and per per-token key group;
            must divide head_dim.
        residual_length: most recent tokens kept in full precision (>= 0).
        key_mode: "channel" (KIVI per-channel keys) or "token" (per-token keys, which eviction can gather).
    Bytes per element ~ bits/8 + 4/group_size (16-bit scale and zero): int4, G=64 -> 0.5625 B (3.56x below bf16).
    """

    bits: int | None = None
    group_size: int = 64
    residual_length: int = 128
    key_mode: str = "channel"

    def __post_init__(self):
        if self.bits is not None and (isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS):
            raise ValueError(f"bits={self.bits!r} is not supported; accepted values: {list(SUPPORTED_BITS)} "
                             "(or None: full precision)")
        _positive_int("group_size", self.group_size, 1)
        _positive_int("residual_length", self.residual_length, 0)
        if self.key_mode not in KEY_MODES:
            raise ValueError(f"key_mode={self.key_mode!r} is not supported; accepted values: {list(KEY_MODES)}")

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def check_head_dim(self, head_dim: int) -> None:
        """Raise a ValueError if `group_size` cannot group this model's head_dim."""
        if self.quantized and head_dim % self.group_size:
            divisors = [d for d in range(1, head_dim + 1) if head_dim % d == 0]
            raise ValueError(
                f"group_size={self.group_size} must divide head_dim={head_dim} (values are grouped along head_dim); "
                f"accepted values: {divisors}"
            )

    def new(self) -> KVStorage:
        """A fresh, empty storage of this kind."""
        if not self.quantized:
            return FullPrecisionKV()
        return QuantizedKV(self.bits, self.group_size, self.residual_length, self.key_mode)


class KVStorage(BatchStateMixin):
    """Interface of one layer's KV slots `[batch, kv_heads, P, head_dim]` (see module docstring)."""

    keys: torch.Tensor | None  # full-precision slots (all of them, or the quantized storage's recent window)
    values: torch.Tensor | None

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append `[B, H, q, D]` keys/values as the last `q` slots (into the full-precision `keys`/`values`)."""
        if self.keys is None:
            self.device = keys.device
            self.keys, self.values = keys, values
        else:
            self.keys = torch.cat([self.keys, keys], dim=-2)
            self.values = torch.cat([self.values, values], dim=-2)

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All `P` slots in full precision, `[B, H, P, D]` each (a transient copy for quantized storage)."""
        raise NotImplementedError

    def keep(self, index: torch.Tensor) -> None:
        """Keep slots `index` `[B, H, K]` (sorted ascending along K) of every row and head, in new compact tensors."""
        raise NotImplementedError

    def flush(self) -> None:
        """Compress what is due (quantized storage: residual overflow); a no-op in full precision."""

    def truncate(self, n: int) -> None:
        """Drop the last `n` slots."""
        raise NotImplementedError

    @property
    def length(self) -> int:
        """Slots stored per row and head (P)."""
        raise NotImplementedError


class FullPrecisionKV(KVStorage):
    """Keys and values in the model's dtype: `keys`/`values` `[B, H, P, D]`."""

    state_names = ("keys", "values")

    def __init__(self):
        self.keys = self.values = None

    def read(self):
        return self.keys, self.values

    def keep(self, index):
        self.keys, self.values = gather_slots(self.keys, index), gather_slots(self.values, index)

    def truncate(self, n):
        if n:
            self.keys, self.values = self.keys[:, :, :-n], self.values[:, :, :-n]

    @property
    def length(self):
        return 0 if self.keys is None else self.keys.shape[-2]


class QuantizedKV(KVStorage):
    """KIVI storage: quantized history `[B, H, T, ...]` then a full-precision residual `keys`/`values` `[B, H, R', D]`.

    History tensors (None while T == 0): `key_codes` uint8 `[B, H, T, D * bits // 8]` (packed along head_dim,
    consecutive channels per byte, low bits first); `value_codes` uint8 token-packed `[B, H, D, P]` (consecutive
    tokens of one channel per byte, P = `packed_columns(T, bits)`: the layout the decode kernel reads,
    kernels/layouts.py; T is `value_scale.shape[2]`); `value_scale`/`value_zero` `[B, H, T, D // G]`;
    `key_scale`/`key_zero` `[B, H, T // G, D]` (key_mode "channel") or `[B, H, T, D // G]` ("token"), in the cache
    dtype. x = code * scale + zero.

    `flush` quantizes the residual's oldest tokens once it holds `residual_length + block` tokens (block = group_size
    for channel keys, 8 for token keys), leaving between `residual_length` and `residual_length + block - 1` in full
    precision; quantized tokens are never re-quantized, except by `keep` with channel keys (see `keep`).
    """

    state_names = ("keys", "values", "key_codes", "key_scale", "key_zero", "value_codes", "value_scale", "value_zero")

    def __init__(self, bits: int, group_size: int = 64, residual_length: int = 128, key_mode: str = "channel"):
        self.bits, self.group_size, self.residual_length, self.key_mode = bits, group_size, residual_length, key_mode
        self.keys = self.values = None
        self.key_codes = self.key_scale = self.key_zero = None
        self.value_codes = self.value_scale = self.value_zero = None

    # ------------------------------------------------------------------ quantizers of this layout
    def _quantize(self, keys, values):
        """(key codes, scale, zero, value codes, scale, zero) of `[B, H, n, D]` full-precision tokens; the value codes
        unpacked, `[B, H, n, D]` (the history packs them by token)."""
        if self.key_mode == "channel":
            key_parts = quantize_keys(keys, self.bits, self.group_size)
        else:
            key_parts = quantize_values(keys, self.bits, self.group_size)
        return (*key_parts, *quantize_values(values, self.bits, self.group_size, pack_codes=False))

    def _history(self):
        return (self.key_codes, self.key_scale, self.key_zero, self.value_codes, self.value_scale, self.value_zero)

    def _set_history(self, parts) -> None:
        (self.key_codes, self.key_scale, self.key_zero, self.value_codes, self.value_scale, self.value_zero) = parts

    @property
    def quantized_length(self) -> int:
        """Tokens held in the quantized history (T)."""
        return 0 if self.key_codes is None else self.key_codes.shape[-2]

    @property
    def length(self):
        return self.quantized_length + (0 if self.keys is None else self.keys.shape[-2])

    def dequantized_history(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Transient full-precision copy of the history, `[B, H, T, D]` each, or None when T == 0."""
        if self.key_codes is None:
            return None
        if self.key_mode == "channel":
            keys = dequantize_keys(self.key_codes, self.key_scale, self.key_zero, self.bits, self.group_size)
        else:
            keys = dequantize_values(self.key_codes, self.key_scale, self.key_zero, self.bits, self.group_size)
        codes = unpack_tokens(self.value_codes, self.bits, self.quantized_length)  # (B, H, T, D), one code per byte
        values = dequantize_values(codes, self.value_scale, self.value_zero, 8, self.group_size)  # 8: codes unpacked
        return keys, values

    def packed(self) -> PackedKV:
        """The decode seam's read-only view of this storage (history tensors None while T == 0)."""
        residual = self.keys is not None and self.keys.shape[-2] > 0
        return PackedKV.view(self.key_codes, self.key_scale, self.key_zero, self.value_codes, self.value_scale,
                             self.value_zero, self.keys if residual else None, self.values if residual else None,
                             self.bits, self.group_size, self.key_mode, value_layout=TOKEN_PACKED)

    # ------------------------------------------------------------------ KVStorage
    def read(self):
        history = self.dequantized_history()
        if history is None:
            return self.keys, self.values
        return torch.cat([history[0], self.keys], dim=-2), torch.cat([history[1], self.values], dim=-2)

    def flush(self):
        if self.keys is None:
            return
        block = self.group_size if self.key_mode == "channel" else TOKEN_FLUSH_BLOCK
        excess = self.keys.shape[-2] - self.residual_length
        n = excess if self.key_mode == "token" else (excess // block) * block
        if excess < block or n <= 0:
            return
        self._append_history(self._quantize(self.keys[:, :, :n], self.values[:, :, :n]))
        # .clone() so the quantized prefix's full-precision storage is really freed (a slice would keep it alive)
        self.keys = self.keys[:, :, n:].clone()
        self.values = self.values[:, :, n:].clone()

    def _append_history(self, parts) -> None:
        """Append quantized tokens (`_quantize`'s parts): codes, scales and zeros concatenated along dim 2 (channel
        keys' scale/zero `[B, H, T // G, D]` too), value codes packed by token after the first T (in place while the
        last 16-byte column has room, so the buffer stays `packed_columns(T)` bytes per channel)."""
        value_codes = append_tokens(self.value_codes, self.quantized_length, parts[VALUE_CODES], self.bits, grow=1)
        if self.key_codes is None:
            parts = list(parts)
        else:
            parts = [None if i == VALUE_CODES else torch.cat([old, new], dim=2)
                     for i, (old, new) in enumerate(zip(self._history(), parts))]
        parts[VALUE_CODES] = value_codes
        self._set_history(parts)

    def keep(self, index):
        """Keep slots `index` `[B, H, K]` (sorted).

        Token keys: the kept history slots are gathered from the codes; the new history is the first T' kept slots of
        every row and head, T' = the largest number of kept history slots in any (row, head), so rows that kept fewer
        take their next kept residual tokens into the history, quantized per token. The rest stays in full precision.
        Channel keys cannot drop single tokens from a group: the kept slots are dequantized, gathered, and the
        storage is rebuilt from them (the history is quantized again: a second rounding; measured in
        docs/composition.md).
        """
        if self.key_mode == "channel":
            keys, values = self.read()
            keys, values = gather_slots(keys, index), gather_slots(values, index)
            self.key_codes = self.key_scale = self.key_zero = None
            self.value_codes = self.value_scale = self.value_zero = None
            self.keys, self.values = keys, values
            self.flush()
            return
        T = self.quantized_length
        n_history = int((index < T).sum(dim=-1).max()) if T else 0  # T'
        residual_index = index[..., n_history:] - T  # (B, H, K - T'): all >= 0, every row's history is in [:T']
        if n_history:
            history_index = index[..., :n_history]  # (B, H, T'); entries >= T are residual tokens to quantize
            parts, value_codes, n = list(self._history()), self.value_codes, T
            if bool((history_index >= T).any()):  # some rows take window tokens into the history
                window = self._quantize(self.keys, self.values)
                new_codes = window[VALUE_CODES]  # (B, H, R, D) unpacked
                value_codes, n = append_tokens(value_codes, T, new_codes, self.bits, grow=1), T + new_codes.shape[2]
                parts = [None if i == VALUE_CODES else torch.cat([old, new], dim=2)
                         for i, (old, new) in enumerate(zip(parts, window))]
            parts = [None if i == VALUE_CODES else gather_slots(p, history_index) for i, p in enumerate(parts)]
            parts[VALUE_CODES] = gather_tokens(value_codes, n, history_index, self.bits)  # unpack, gather, repack
            self._set_history(parts)
        else:
            self.key_codes = self.key_scale = self.key_zero = None
            self.value_codes = self.value_scale = self.value_zero = None
        self.keys, self.values = gather_slots(self.keys, residual_index), gather_slots(self.values, residual_index)

    def truncate(self, n):
        if n == 0:
            return
        residual = 0 if self.keys is None else self.keys.shape[-2]
        if n > residual:
            raise ValueError(
                f"cannot remove the last {n} tokens: only the last {residual} are still in full precision; "
                "quantized blocks cannot be rolled back"
            )
        self.keys, self.values = self.keys[:, :, : residual - n], self.values[:, :, : residual - n]
