"""What a cache layer asks of the decode seam: whether to fuse a forward, and the fused attention itself.

A layer that fuses returns only its full-precision residual from `update` (no dequantized history), leaves itself
pending on the attention bridge, and its attention then calls `attend` (host-checked left padding: `QuantizedKV`,
the evicting storage) or `attend_static` (left padding read on the device: the compiled static step), both over
`store.packed()`. Where the mask or the kwargs ask for something the kernel does not compute (right padding, sliding
windows, attention sinks, dropout), `attend` returns None and the caller runs the model's attention over a dequantized
copy. Which implementation runs is `dispatch.select`'s decision, the same one `fusable` asked.
"""

from __future__ import annotations

import torch

from .dispatch import check_impl, decode, decode_probs, probs_impl, select, triton_available
from .masks import decode_start, kv_start_from_mask

FUSED_CHOICES = (None, True, False)
MAX_QUERIES = 16


def check_options(fused, kernel_impl: str) -> None:
    """ValueError for a bad `fused` / `kernel_impl` argument of a cache."""
    if fused not in FUSED_CHOICES or (fused is not None and not isinstance(fused, bool)):
        raise ValueError(f"fused={fused!r} is not supported; accepted values: [None (auto: CUDA with triton), True, "
                         "False]")
    check_impl(kernel_impl, "kernel_impl")


def model_device(model) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def wants_bridge(fused, model) -> bool:
    """Whether a cache built with `fused` for `model` attaches the fused path (None: on CUDA when triton imports)."""
    if fused is None:
        return model_device(model).type == "cuda" and triton_available()
    return fused


def fusable(store, q: int, kernel_impl: str = "auto") -> bool:
    """True if a forward of `q` queries over `store` (a `QuantizedKV`) should decode through the seam.

    Needs a quantized history (else there is nothing to dequantize), 1 <= q <= 16, a supported dtype, and an
    implementation `select` accepts for this device and layout (on CUDA, "auto": the Triton kernel)."""
    if not 1 <= q <= MAX_QUERIES or getattr(store, "key_codes", None) is None or store.key_codes.shape[2] == 0:
        return False
    keys = store.keys
    if keys is None:
        return False
    chosen, _ = select(kernel_impl, keys.device, keys.dtype, keys.shape[-1], store.bits, store.group_size,
                       store.key_mode)
    return chosen is not None


VARIANT_KWARGS = ("sliding_window", "s_aux", "position_bias")  # attention variants no kernel or one-pass step computes


def unplain_kwargs(kwargs) -> list[str]:
    """The attention kwargs asking for more than plain softmax attention (scaling, softcap), by name: the variants
    (sliding window, attention sinks, position bias) and dropout; [] if none."""
    return [k for k in VARIANT_KWARGS if kwargs.get(k) is not None] + (["dropout"] if kwargs.get("dropout") else [])


def plain_kwargs(kwargs) -> bool:
    """The kernels compute plain softmax attention (scaling, softcap): False if the kwargs ask for anything else."""
    return not unplain_kwargs(kwargs)


def _decode_start(store, query: torch.Tensor, attention_mask, kwargs: dict):
    """(True, `kv_start`) if the kernel computes what this forward's mask and kwargs ask for (plain softmax attention,
    left padding only), else (False, None)."""
    if not plain_kwargs(kwargs):
        return False, None
    return kv_start_from_mask(attention_mask, query.shape[-2], store.length)


def attend(store, query: torch.Tensor, attention_mask, kwargs: dict, kernel_impl: str = "auto"):
    """`[B, q, H_q, D]` attention of `query` `[B, H_q, q, D]` over `store.packed()` (this forward's keys already
    appended), in transformers' attention-output layout; None if the kernel cannot compute what the mask/kwargs ask
    for (the caller then runs the base attention)."""
    ok, kv_start = _decode_start(store, query, attention_mask, kwargs)
    if not ok:
        return None
    out = decode(query, store.packed(), kv_start, kwargs.get("scaling"), kwargs.get("softcap"), kernel_impl)
    return out.transpose(1, 2).contiguous()  # [B, q, H_q, D]; a no-op copy for q == 1


def probs_fusable(store, q: int, kernel_impl: str = "auto") -> bool:
    """`fusable`, for a layer that also needs each slot's attention probability (attention-ranked eviction): one
    query (a decode step) and an implementation that returns probabilities (`probs_impl`: the Triton kernel on CUDA;
    on a CPU only when forced)."""
    if q != 1 or not fusable(store, q, kernel_impl):
        return False
    keys = store.keys
    return probs_impl(kernel_impl, keys.device, keys.dtype, keys.shape[-1], store.bits, store.group_size,
                      store.key_mode) is not None


def attend_probs(store, query: torch.Tensor, attention_mask, kwargs: dict, kernel_impl: str = "auto"):
    """`attend` plus each slot's probability: (`[B, q, H_q, D]` output, fp32 `[B, H_kv, P]` attention mass summed
    over each KV head's query heads, P = `store.length`, history then residual: the slot order), or None where the
    kernel cannot compute what the mask/kwargs ask for."""
    ok, kv_start = _decode_start(store, query, attention_mask, kwargs)
    if not ok:
        return None
    out, mass = decode_probs(query, store.packed(), kv_start, kwargs.get("scaling"), kwargs.get("softcap"),
                             impl=kernel_impl)
    return out.transpose(1, 2).contiguous(), mass


def static_refusal(device: torch.device, head_dim: int, bits: int, group_size: int, kernel_impl: str) -> str | None:
    """None if a static cache on `device` can decode through the seam with fixed launch arguments, else why not.

    On CUDA "auto" needs an implementation that reads the valid lengths on the device (the Triton kernel: CUDA graphs
    capture it); a forced "torch"/"sdpa" reads them on the host (debugging only). Elsewhere any implementation."""
    dtype = torch.float32
    chosen, reason = select(kernel_impl, device, dtype, head_dim, bits, group_size, "channel")
    if chosen is None:
        return reason
    if device.type == "cuda" and kernel_impl == "auto" and not chosen.device_lengths:
        return f"{chosen.name!r} reads the valid lengths on the host (CUDA graphs cannot capture it)"
    return None


def attend_static(store, query: torch.Tensor, attention_mask, kwargs: dict, kernel_impl: str = "auto"):
    """`[B, q, H_q, D]` attention of `query` `[B, H_q, q, D]` over a static store's packed view (valid lengths on the
    device, left padding read from the mask's last row on the device): the compiled decode step, no host sync."""
    out = decode(query, store.packed(), decode_start(attention_mask), kwargs.get("scaling"), kwargs.get("softcap"),
                 kernel_impl)
    return out.transpose(1, 2).contiguous()


__all__ = ["attend", "attend_probs", "attend_static", "check_options", "fusable", "model_device", "plain_kwargs",
           "probs_fusable", "static_refusal", "unplain_kwargs", "wants_bridge"]
