"""The fused decode path: attention over a `QuantizedKV` store's packed tensors, reached through the attention bridge.

A cache layer that decides, in `update`, to fuse returns only its full-precision residual (no dequantized history) and
leaves itself pending on `kvpress_lite.attention_bridge`; its `attend` then calls `attend_store`, which runs
`quantized_decode_attention` over the history codes/scales/zeros and the residual, with per-row left padding
(`kv_start`) read from the model's mask and scaling/softcap from the attention module's kwargs. Where the mask or the
kwargs ask for something the kernel does not compute (right padding, sliding windows, attention sinks, dropout),
`attend_store` returns None and the caller runs the model's own attention over a dequantized copy.
"""

from __future__ import annotations

import torch

from .. import attention_bridge
from . import op as _op_module
from .op import DTYPES, IMPLS, triton_available

FUSED_CHOICES = (None, True, False)
MAX_QUERIES = 16


def check_options(fused, kernel_impl: str) -> None:
    """ValueError for a bad `fused` / `kernel_impl` argument of a cache."""
    if fused not in FUSED_CHOICES or (fused is not None and not isinstance(fused, bool)):
        raise ValueError(f"fused={fused!r} is not supported; accepted values: [None (auto: CUDA with triton), True, "
                         "False]")
    if kernel_impl not in IMPLS:
        raise ValueError(f"kernel_impl={kernel_impl!r} is not supported; accepted values: {list(IMPLS)}")


def model_device(model) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def wants_bridge(fused, model) -> bool:
    """Whether a cache built with `fused` for `model` attaches the fused path (None: on CUDA when triton imports)."""
    if fused is None:
        return model_device(model).type == "cuda" and triton_available()
    return fused


def fusable(store, q: int, kernel_impl: str) -> bool:
    """True if a forward of `q` queries over `store` should run the kernel instead of a dequantized copy.

    Needs a quantized history (else there is nothing to dequantize), 1 <= q <= 16, a supported dtype, and with
    kernel_impl "auto" on CUDA a layout the Triton kernel handles (the torch reference would dequantize anyway).
    """
    if not 1 <= q <= MAX_QUERIES or getattr(store, "key_codes", None) is None or store.key_codes.shape[2] == 0:
        return False
    if store.keys is None or store.keys.dtype not in DTYPES:
        return False
    if kernel_impl in ("torch", "sdpa"):
        return True
    refusal = _op_module._triton_refusal(store.keys, store.keys.shape[-1], store.bits, store.group_size,
                                         store.key_mode == "channel")
    return refusal is None


def _plain_kwargs(kwargs) -> bool:
    """The kernel computes plain softmax attention (scaling, softcap): refuse anything else the kwargs ask for."""
    return (kwargs.get("sliding_window") is None and kwargs.get("s_aux") is None
            and kwargs.get("position_bias") is None and not kwargs.get("dropout"))


def attend_store(store, query: torch.Tensor, attention_mask, kwargs: dict, kernel_impl: str = "auto"):
    """`[B, q, H_q, D]` attention output of `query` `[B, H_q, q, D]` over `store` (a `QuantizedKV` holding this
    forward's keys already), in transformers' attention-output layout; None if the kernel cannot compute what the
    mask/kwargs ask for (the caller then runs the base attention)."""
    q = query.shape[-2]
    if not _plain_kwargs(kwargs):
        return None
    ok, kv_start = attention_bridge.kv_start_from_mask(attention_mask, q, store.length)
    if not ok:
        return None
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    residual = store.keys is not None and store.keys.shape[2] > 0
    args = (query, store.key_codes, store.key_scale, store.key_zero, store.value_codes, store.value_scale,
            store.value_zero, store.keys if residual else None, store.values if residual else None, kv_start,
            int(store.bits), int(store.group_size), store.key_mode == "channel", float(scaling),
            float(kwargs.get("softcap") or 0.0))
    if query.is_cuda and kernel_impl != "torch" and not torch.compiler.is_compiling():
        # eager decoding on CUDA: the Triton launcher directly (no custom-op dispatch: host time is most of a batch-1
        # step); `fusable` checked the layout. Under torch.compile the op below is traced instead.
        out = _op_module.launch_triton(*args)
    else:  # the op (no argument re-validation: the store's layout is known), traceable by torch.compile
        out = _op_module._op(*args, kernel_impl)
    return out.transpose(1, 2).contiguous()  # [B, q, H_q, D]; a no-op copy for q == 1


def static_refusal(device: torch.device, head_dim: int, bits: int, group_size: int, kernel_impl: str) -> str | None:
    """None if a static cache on `device` can decode through the kernel with fixed launch arguments, else why not.

    On CUDA that is the Triton kernel (the torch paths read the valid lengths on the host, which CUDA graphs cannot
    capture: "torch"/"sdpa" there are for debugging); elsewhere the op's torch paths ("auto": "sdpa")."""
    if device.type != "cuda" or kernel_impl in ("torch", "sdpa"):
        return None
    probe = torch.empty(0, device=device)
    return _op_module._triton_refusal(probe, head_dim, bits, group_size, True)


def decode_start(attention_mask) -> torch.Tensor | None:
    """Per-row first attended key `[B]` int32 from the last query row of a 4D mask `[B, 1, q, K]` (None: no mask).

    No host sync and no check (a compiled step cannot branch on data): the static cache checks the mask is left
    padding + causal on its host path (`attention_bridge.kv_start_from_mask`) before it decodes this way."""
    if attention_mask is None:
        return None
    last = attention_mask[:, 0, -1]
    allowed = last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2
    return allowed.to(torch.int32).argmax(-1).to(torch.int32)


def attend_static(store, query: torch.Tensor, kv_start, kwargs: dict, kernel_impl: str = "auto") -> torch.Tensor:
    """`[B, q, H_q, D]` attention of `query` `[B, H_q, q, D]` over a `StaticQuantizedKV` (valid lengths read by the
    kernel from `store.lengths`, nothing read on the host): the decode step of the static cache."""
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    args = (query, store.key_codes, store.key_scale, store.key_zero, store.value_codes, store.value_scale,
            store.value_zero, store.keys, store.values, kv_start, int(store.bits), int(store.group_size), True,
            float(scaling), float(kwargs.get("softcap") or 0.0))
    if not query.is_cuda and kernel_impl == "auto":
        kernel_impl = "sdpa"  # the fast torch path on a CPU (the fp32 reference is impl "torch")
    if query.is_cuda and kernel_impl not in ("torch", "sdpa") and not torch.compiler.is_compiling():
        out = _op_module.launch_triton(*args, lengths=store.lengths)
    else:
        out = _op_module._op(*args, kernel_impl, store.lengths)
    return out.transpose(1, 2).contiguous()


__all__ = ["attend_static", "attend_store", "check_options", "decode_start", "fusable", "static_refusal",
           "wants_bridge"]
