"""Decode-attention kernels over the packed KIVI storage (`kvpress_lite.storage.QuantizedKV`).

`quantized_decode_attention` is the one entry point (a `torch.library` custom op): a Triton flash-decoding kernel
on CUDA (triton is optional), the torch reference (`reference_decode_attention`) elsewhere. See docs/kernels.md.
"""

from .op import IMPLS, quantized_decode_attention, triton_available
from .reference import dequantize_history, reference_decode_attention, unpack_codes

__all__ = [
    "IMPLS",
    "dequantize_history",
    "quantized_decode_attention",
    "reference_decode_attention",
    "triton_available",
    "unpack_codes",
]
