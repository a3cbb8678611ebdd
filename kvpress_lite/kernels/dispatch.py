"""Which implementation decodes a `PackedKV`, decided in one place (`select`), and the one entry `decode`.

Implementations register per device type (`register`): the Triton kernel is "auto" on CUDA, the sdpa path (history
dequantized in the cache dtype, then SDPA) "auto" elsewhere, and the fp32 torch reference ("torch") runs anywhere
when asked for. `select(impl, ...)` is the only guard: layers ask it whether to fuse, `decode` asks it what to run,
eager and compiled alike. Eagerly, `decode` calls the chosen function directly (no custom-op dispatch: eager decode
on CUDA is host-bound); under `torch.compile` it calls the op (`op.py`), whose body runs the implementation `select`
chose at trace time. Tests and benchmarks force an implementation with `prefer(name)` (a context manager that
replaces "auto"), or a cache's `kernel_impl`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .packed import PackedKV
from .reference import reference_decode_attention, reference_decode_attention_probs
from .sdpa_path import dequantized_sdpa_attention

try:
    from . import triton_decode as _triton
    _TRITON_ERROR = None
except ImportError as exc:  # triton is an optional dependency
    _triton = None
    _TRITON_ERROR = exc

AUTO = "auto"
ANY_DEVICE = "*"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class Implementation:
    """One decode implementation: `fn(query, packed, kv_start, scaling, softcap) -> [B, H_q, q, D]`.

    refusal: `(device, head_dim, bits, group_size, key_mode) -> str | None` (None: it runs there).
    device_lengths: reads `packed.lengths` on the device (no host sync), so CUDA graphs can capture it.
    probs_fn: None, or `(query, packed, kv_start, scaling, softcap, positions, return_probs) -> (out, probs | None)`:
    per-entry validity by `positions` and each entry's attention probability from the same pass (`decode_probs`).
    """

    name: str
    fn: Callable
    refusal: Callable | None = None
    device_lengths: bool = False
    probs_fn: Callable | None = None


IMPLEMENTATIONS: dict[str, Implementation] = {}
_AUTO_ORDER: dict[str, list[str]] = {}  # device type ("cuda", "cpu", ... or ANY_DEVICE) -> names "auto" tries
_preferred: list[str] = []  # stack of `prefer(...)` names
_memo: dict = {}


def register(impl: Implementation, auto_for: tuple[str, ...] = ()) -> None:
    """Register `impl` by name; `auto_for`: device types (or `ANY_DEVICE`) where "auto" tries it, in call order."""
    IMPLEMENTATIONS[impl.name] = impl
    for device_type in auto_for:
        _AUTO_ORDER.setdefault(device_type, []).append(impl.name)
    _memo.clear()


def names() -> tuple[str, ...]:
    """Accepted values of `impl` / `kernel_impl`: "auto" and every registered name."""
    return (AUTO, *IMPLEMENTATIONS)


def check_impl(impl: str, parameter: str = "impl") -> None:
    if impl not in IMPLEMENTATIONS and impl != AUTO:
        raise ValueError(f"{parameter}={impl!r} is not supported; accepted values: {list(names())}")


@contextlib.contextmanager
def prefer(name: str):
    """Within the block, "auto" means `name` (e.g. "torch": the fp32 reference everywhere). For tests/benchmarks."""
    check_impl(name)
    _preferred.append(name)
    _memo.clear()
    try:
        yield
    finally:
        _preferred.pop()
        _memo.clear()


def _decide(impl: str, device: torch.device, dtype, head_dim: int, bits: int, group_size: int, key_mode: str):
    if dtype not in DTYPES:
        return None, f"dtype {dtype} is not supported; accepted values: {[str(d) for d in DTYPES]}"
    if impl == AUTO and _preferred:
        impl = _preferred[-1]
    if impl != AUTO:
        chosen = IMPLEMENTATIONS[impl]
        reason = chosen.refusal(device, head_dim, bits, group_size, key_mode) if chosen.refusal else None
        return (None, f"impl={impl!r} cannot run here: {reason}") if reason else (chosen, None)
    reasons = []
    for name in _AUTO_ORDER.get(device.type, _AUTO_ORDER.get(ANY_DEVICE, [])):
        chosen = IMPLEMENTATIONS[name]
        reason = chosen.refusal(device, head_dim, bits, group_size, key_mode) if chosen.refusal else None
        if reason is None:
            return chosen, None
        reasons.append(f"{name}: {reason}")
    return None, "; ".join(reasons) or f"no implementation for device type {device.type!r}"


def select(impl: str, device: torch.device, dtype, head_dim: int, bits: int, group_size: int, key_mode: str):
    """(the `Implementation` that decodes this layout, None) or (None, why none can). The one guard: memoized on the
    host (eager decoding calls it once per layer and step), computed afresh while torch.compile traces."""
    key = (impl, device, dtype, head_dim, bits, group_size, key_mode)
    if torch.compiler.is_compiling():
        return _decide(*key)
    found = _memo.get(key)
    if found is None:
        found = _memo[key] = _decide(*key)
    return found


def decode(query: torch.Tensor, packed: PackedKV, kv_start: torch.Tensor | None, scaling: float | None,
           softcap: float | None, impl: str = AUTO) -> torch.Tensor:
    """`[B, H_q, q, D]` attention of `query` `[B, H_q, q, D]` over `packed` (no argument validation: callers pass a
    store's own view; `op.quantized_decode_attention` validates user input). Raises a RuntimeError if `impl` cannot
    run here (layers ask `select` first)."""
    chosen, reason = select(impl, query.device, query.dtype, query.shape[-1], packed.bits, packed.group_size,
                            packed.key_mode)
    if chosen is None:
        raise RuntimeError(reason)
    scaling = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    softcap = float(softcap or 0.0)
    if not torch.compiler.is_compiling():
        return chosen.fn(query, packed, kv_start, scaling, softcap)
    from .op import decode_op  # noqa: PLC0415 - op.py imports this module

    return decode_op(query, *packed.tensors(), kv_start, None, *packed.statics(), scaling, softcap, chosen.name,
                     False)[0]


def probs_impl(impl: str, device: torch.device, dtype, head_dim: int, bits: int, group_size: int, key_mode: str):
    """The `Implementation` `select` picks if it also computes probabilities (`probs_fn`), else None: e.g. "auto" on
    CUDA is the Triton kernel; on a CPU it is the sdpa path, which has none (callers keep their own torch code)."""
    chosen, _ = select(impl, device, dtype, head_dim, bits, group_size, key_mode)
    return chosen if chosen is not None and chosen.probs_fn is not None else None


def decode_probs(query: torch.Tensor, packed: PackedKV, kv_start: torch.Tensor | None, scaling: float | None,
                 softcap: float | None, positions: torch.Tensor | None = None, return_probs: bool = True,
                 impl: str = AUTO):
    """(`[B, H_q, q, D]` output, fp32 `[B, H_kv, T_cap + R_cap]` probabilities or None): `decode`, plus each entry's
    attention probability summed over the query heads of its KV head and the queries, from the same pass.

    positions: None, or int `[B, H_kv, T_cap + R_cap]` (history entries, then residual entries): each entry's own
    position, attended iff `positions >= kv_start[b]` (-1: empty), instead of the prefix rule of left padding
    (eviction's slots). return_probs False: the output only (validity by `positions` still applies). Raises a
    RuntimeError if the implementation chosen for `impl` cannot run here or computes no probabilities (`probs_impl`
    first). Compiled: the opaque op `kvpress_lite::decode_attention` (op.py), as `decode`."""
    chosen, reason = select(impl, query.device, query.dtype, query.shape[-1], packed.bits, packed.group_size,
                            packed.key_mode)
    if chosen is None:
        raise RuntimeError(reason)
    return decode_probs_with(chosen, query, packed, kv_start, scaling, softcap, positions, return_probs)


def decode_probs_with(chosen: Implementation, query: torch.Tensor, packed: PackedKV, kv_start: torch.Tensor | None,
                      scaling: float | None, softcap: float | None, positions: torch.Tensor | None = None,
                      return_probs: bool = True):
    """`decode_probs` through an implementation already chosen (`probs_impl`, asked once on the host): a compiled
    step that decided at its start traces no dispatch logic, only the op."""
    if chosen.probs_fn is None:
        raise RuntimeError(f"impl {chosen.name!r} computes no attention probabilities; accepted: "
                           f"{[n for n, i in IMPLEMENTATIONS.items() if i.probs_fn is not None]}")
    scaling = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    softcap = float(softcap or 0.0)
    if not torch.compiler.is_compiling():
        return chosen.probs_fn(query, packed, kv_start, scaling, softcap, positions, bool(return_probs))
    from .op import decode_op  # noqa: PLC0415 - op.py imports this module

    out, probs = decode_op(query, *packed.tensors(), kv_start, positions, *packed.statics(), scaling, softcap,
                           chosen.name, bool(return_probs))
    return out, (probs if return_probs else None)


def triton_available() -> bool:
    """True if triton imported (it may still need CUDA tensors or TRITON_INTERPRET=1 to run)."""
    return _triton is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_refusal(device, head_dim, bits, group_size, key_mode) -> str | None:
    if _triton is None:
        return f"triton is not installed ({_TRITON_ERROR}); `pip install triton`"
    if device.type != "cuda" and not _interpreting():
        return (f"the Triton kernel needs CUDA tensors (got device {device}), or TRITON_INTERPRET=1 set before "
                "triton is imported to run it on CPU")
    return _triton.supported_shape(head_dim, bits, group_size, key_mode == "channel")


def _triton_fn(query, packed, kv_start, scaling, softcap):
    return _triton.triton_decode_attention(query, packed, kv_start, scaling, softcap)


def _triton_probs_fn(query, packed, kv_start, scaling, softcap, positions, return_probs):
    if not return_probs:
        return _triton.triton_decode_attention(query, packed, kv_start, scaling, softcap, positions=positions), None
    return _triton.triton_decode_attention(query, packed, kv_start, scaling, softcap, positions=positions,
                                           return_probs=True)


def _reference_probs_fn(query, packed, kv_start, scaling, softcap, positions, return_probs):
    out, probs = reference_decode_attention_probs(query, packed, kv_start, scaling, softcap, positions)
    return out, (probs if return_probs else None)


register(Implementation("triton", _triton_fn, _triton_refusal, device_lengths=True, probs_fn=_triton_probs_fn),
         auto_for=("cuda",))
register(Implementation("sdpa", dequantized_sdpa_attention), auto_for=(ANY_DEVICE,))
register(Implementation("torch", reference_decode_attention, probs_fn=_reference_probs_fn))


__all__ = ["AUTO", "IMPLEMENTATIONS", "Implementation", "check_impl", "decode", "decode_probs", "decode_probs_with",
           "names", "prefer", "probs_impl", "register", "select", "triton_available"]
