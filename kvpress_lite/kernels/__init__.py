"""Decode attention over packed KIVI storage: the decode seam (see docs/decode-seam.md and docs/kernels.md).

A storage hands its packed tensors over as a `PackedKV` (`store.packed()`); `decode(query, packed, kv_start, scaling,
softcap)` runs the implementation `dispatch.select` picks for the device (Triton on CUDA, the sdpa path elsewhere, the
fp32 torch reference on request), eagerly or through the `torch.library` op under torch.compile.
`quantized_decode_attention` is the validating public entry over flat tensors. Nothing here imports the caches.
"""

from .dispatch import (
    IMPLEMENTATIONS,
    decode,
    decode_probs,
    names,
    prefer,
    probs_impl,
    register,
    select,
    triton_available,
)
from .masks import decode_start, kv_start_from_mask
from .op import quantized_decode_attention
from .packed import PackedKV
from .reference import dequantize_history, reference_decode_attention, reference_decode_attention_probs, unpack_codes

IMPLS = names()  # accepted `impl` / `kernel_impl` values, at import (later `register` calls: `names()`)

__all__ = [
    "IMPLEMENTATIONS",
    "IMPLS",
    "PackedKV",
    "decode",
    "decode_probs",
    "decode_start",
    "dequantize_history",
    "kv_start_from_mask",
    "names",
    "prefer",
    "probs_impl",
    "quantized_decode_attention",
    "reference_decode_attention",
    "reference_decode_attention_probs",
    "register",
    "select",
    "triton_available",
    "unpack_codes",
]
