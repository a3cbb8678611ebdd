"""Storage layouts of packed code tensors (`PackedKV.key_layout` / `value_layout`) and the helpers storages need.

Two layouts (names in `kvpress_lite.kernels.packed`):

- `CHANNEL_PACKED` ("channel"): `[B, H, T, D * bits / 8]` uint8, the codes of consecutive channels of one token share
  a byte (low bits first). What `kivi.quantize_keys` / `quantize_values` return.
- `TOKEN_PACKED` ("token"): `[B, H, D, P]` uint8, channel-major; byte `p` of channel `d` holds the codes of tokens
  `p * PB .. p * PB + PB - 1` (`PB = 8 // bits` codes per byte, the earliest token in the lowest bits). `P` is a
  multiple of `TOKEN_ALIGN` (16 bytes: the kernel's loads are 16-byte vectors) with `P * PB >= T`; the number of
  tokens `T` is not stored in the codes (a storage knows it: `value_scale.shape[2]`); bits past `T` may hold anything.
  Made for the decode kernel: attention's `p @ V` reduces over tokens, so the tensor-core B operand wants pairs of
  consecutive *tokens* of one channel in a register, which is what one byte of int4 codes is here (docs/kernels.md).

Helpers for the token layout, each equal to the same operation on unpacked codes (tests/test_kernels.py):
`pack_tokens` / `unpack_tokens` (codes `[B, H, T, D]` <-> packed), `append_tokens` (a block after T tokens, any T:
a straddled byte is merged), `write_tokens` (a block at any token offset of a preallocated buffer, in place),
`gather_tokens` (arbitrary kept slots per row and head: unpack, gather, repack), `token_packed_nbytes`, and
`to_channel_packed` / `from_channel_packed` (conversion between the two layouts).
"""

from __future__ import annotations

import torch

from .packed import CHANNEL_PACKED, TOKEN_PACKED

TOKEN_ALIGN = 16  # bytes: the packed token dimension is a multiple of this
LAYOUTS = (CHANNEL_PACKED, TOKEN_PACKED)


def _per_byte(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"bits={bits} is not supported; accepted values: [2, 4, 8]")
    return 8 // bits


def packed_columns(tokens: int, bits: int) -> int:
    """Bytes per channel row of the token layout for `tokens` tokens: ceil(tokens / PB) rounded up to TOKEN_ALIGN."""
    if tokens < 0:
        raise ValueError(f"tokens={tokens} must be >= 0")
    pb = _per_byte(bits)
    cols = -(-tokens // pb)
    return -(-cols // TOKEN_ALIGN) * TOKEN_ALIGN


def token_packed_nbytes(batch: int, heads: int, head_dim: int, tokens: int, bits: int) -> int:
    """Exact bytes of a token-packed code tensor holding `tokens` tokens (padding included)."""
    return batch * heads * head_dim * packed_columns(tokens, bits)


def pack_tokens(codes: torch.Tensor, bits: int, capacity: int | None = None) -> torch.Tensor:
    """uint8 codes `[B, H, T, D]` in `[0, 2**bits)` -> token-packed `[B, H, D, P]` (P from `capacity` >= T tokens,
    default T; padding bytes are zero)."""
    if codes.dim() != 4 or codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8 [B, H, T, D], got {tuple(codes.shape)} {codes.dtype}")
    b, h, t, d = codes.shape
    cap = t if capacity is None else capacity
    if cap < t:
        raise ValueError(f"capacity={capacity} is below the {t} tokens to pack")
    pb = _per_byte(bits)
    cols = packed_columns(cap, bits)
    x = torch.zeros((b, h, d, cols * pb), dtype=torch.uint8, device=codes.device)
    x[:, :, :, :t] = codes.transpose(2, 3)
    x = x.view(b, h, d, cols, pb)
    out = x[..., 0].clone()
    for i in range(1, pb):
        out |= x[..., i] << (bits * i)
    return out


def unpack_tokens(packed: torch.Tensor, bits: int, tokens: int) -> torch.Tensor:
    """Token-packed `[B, H, D, P]` -> uint8 codes `[B, H, tokens, D]` (the first `tokens` tokens)."""
    if packed.dim() != 4 or packed.dtype != torch.uint8:
        raise ValueError(f"packed codes must be uint8 [B, H, D, P], got {tuple(packed.shape)} {packed.dtype}")
    pb = _per_byte(bits)
    if tokens > packed.shape[3] * pb or tokens < 0:
        raise ValueError(f"tokens={tokens} is outside [0, {packed.shape[3] * pb}] (P={packed.shape[3]} bytes)")
    n = -(-tokens // pb)
    x = packed[..., :n]
    if pb > 1:
        mask = (1 << bits) - 1
        x = torch.stack([(x >> (bits * i)) & mask for i in range(pb)], dim=-1).flatten(-2)
    return x[..., :tokens].transpose(2, 3).contiguous()


def write_tokens(buf: torch.Tensor, offset: int, codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Write codes `[B, H, n, D]` at tokens `offset .. offset + n` of a token-packed buffer `[B, H, D, P]` in place
    (any offset: bytes shared with neighbouring tokens are read, merged and written back); returns `buf`."""
    pb = _per_byte(bits)
    n = codes.shape[2]
    if offset < 0 or offset + n > buf.shape[3] * pb:
        raise ValueError(f"tokens [{offset}, {offset + n}) do not fit a buffer of {buf.shape[3] * pb} tokens")
    if n == 0:
        return buf
    c0, c1 = offset // pb, -(-(offset + n) // pb)  # packed columns touched
    if pb == 1:
        buf[:, :, :, c0:c1] = codes.transpose(2, 3)
        return buf
    old = unpack_tokens(buf[..., c0:c1], bits, (c1 - c0) * pb)  # [B, H, (c1-c0)*PB, D]
    old[:, :, offset - c0 * pb: offset - c0 * pb + n] = codes
    x = old.transpose(2, 3).reshape(*old.shape[:2], old.shape[3], c1 - c0, pb)
    out = x[..., 0].clone()
    for i in range(1, pb):
        out |= x[..., i] << (bits * i)
    buf[..., c0:c1] = out
    return buf


def append_tokens(buf: torch.Tensor | None, tokens: int, codes: torch.Tensor, bits: int,
                  grow: int = 256) -> torch.Tensor:
    """Append codes `[B, H, n, D]` after the first `tokens` tokens of a token-packed buffer (None: empty); returns a
    buffer holding `tokens + n` tokens: `buf` itself, written in place, if it has room, else a copy grown to a multiple
    of `grow` tokens (amortized: not every block reallocates)."""
    b, h, n, d = codes.shape
    need = tokens + n
    if buf is None or buf.shape[3] * _per_byte(bits) < need:
        cap = -(-need // grow) * grow
        new = torch.zeros((b, h, d, packed_columns(cap, bits)), dtype=torch.uint8, device=codes.device)
        if buf is not None and tokens:
            used = -(-tokens // _per_byte(bits))
            new[..., :used] = buf[..., :used]
        buf = new
    return write_tokens(buf, tokens, codes, bits)


def gather_tokens(buf: torch.Tensor, tokens: int, index: torch.Tensor, bits: int,
                  capacity: int | None = None) -> torch.Tensor:
    """Keep slots `index` `[B, H, K]` (int, each in [0, tokens)) of the first `tokens` tokens: a new token-packed
    buffer of K tokens (capacity as in `pack_tokens`), i.e. `pack_tokens(unpack_tokens(buf)[gathered])`."""
    codes = unpack_tokens(buf, bits, tokens)
    idx = index.long().unsqueeze(-1).expand(-1, -1, -1, codes.shape[3])
    return pack_tokens(torch.gather(codes, 2, idx), bits, capacity)


def from_channel_packed(codes: torch.Tensor, bits: int, capacity: int | None = None) -> torch.Tensor:
    """Channel-packed `[B, H, T, D * bits / 8]` -> token-packed `[B, H, D, P]`."""
    from ..kivi import unpack

    return pack_tokens(unpack(codes, bits), bits, capacity)


def to_channel_packed(codes: torch.Tensor, layout: str, bits: int, tokens: int) -> torch.Tensor:
    """Codes in `layout` -> channel-packed `[B, H, tokens, D * bits / 8]` (the first `tokens` tokens)."""
    if layout == CHANNEL_PACKED:
        return codes[:, :, :tokens]
    if layout == TOKEN_PACKED:
        from ..kivi import pack

        return pack(unpack_tokens(codes, bits, tokens), bits)
    raise ValueError(f"layout={layout!r} is not supported; accepted values: {list(LAYOUTS)}")


__all__ = ["LAYOUTS", "TOKEN_ALIGN", "append_tokens", "from_channel_packed", "gather_tokens", "pack_tokens",
           "packed_columns", "to_channel_packed", "token_packed_nbytes", "unpack_tokens", "write_tokens"]
