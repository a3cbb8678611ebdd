"""Resident bytes of a cache: what it really keeps, counted from tensor storages."""

from __future__ import annotations

import torch


def _inner_tensors(obj, seen: set[int]):
    """Yield plain tensors reachable from `obj` (attributes, lists, dicts, tensor-subclass internals)."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        subclass = type(obj) is not torch.Tensor and not isinstance(obj, torch.nn.Parameter)
        if subclass and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()  # quantized tensor subclasses (e.g. optimum-quanto)
            for name in names:
                yield from _inner_tensors(getattr(obj, name), seen)
        else:
            yield obj
    elif isinstance(obj, (list, tuple, set)):
        for item in obj:
            yield from _inner_tensors(item, seen)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _inner_tensors(item, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
        for item in vars(obj).values():
            yield from _inner_tensors(item, seen)


def cache_nbytes(cache) -> int:
    """Resident bytes of everything `cache` keeps: codes, scales, zeros, residual windows, indices, scores.

    Works for kvpress_lite caches and transformers' (DynamicCache, QuantizedCache...). Each underlying
    storage is counted once, in full, so a slice that pins a larger buffer is charged for the buffer.
    """
    storages: dict[tuple, int] = {}
    for layer in getattr(cache, "layers", [cache]):
        for tensor in _inner_tensors(layer, set()):
            storage = tensor.untyped_storage()
            storages[(tensor.device.type, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())
