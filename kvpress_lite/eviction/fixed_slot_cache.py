"""`FixedSlotEvictionCache`: eviction with a fixed-shape decode step, so `generate` compiles it (CUDA graphs)."""

from __future__ import annotations

import functools
import weakref

from .. import _compat, attention_bridge
from ..cache import CompressedCache
from ..kernels.dispatch import check_impl
from ..registry import register
from ..sliding import StaticSlidingWindowKVLayer
from ..storage import StorageSpec
from .fixed_slot import SUPPORTED_BITS, SUPPORTED_POLICIES, FixedSlotLayer
from .fixed_slot_store import QuantizedSlotKV, SlotKV
from .policy import EvictionBudget, make_policy


class FixedSlotEvictionCache(CompressedCache):
    """Evicting KV cache with preallocated slots: full-attention layers keep `budget` tokens per (row, kv head) between
    steps, as `EvictionCache(slack=0)`, of which the last `recent` in a full-precision ring that also holds the
    incoming token (`budget + 1` entries); each decode step writes in place (`is_compileable`).

    Example (CUDA; `generate` compiles the decode step on its own):
        with FixedSlotEvictionCache(model, policy="h2o", ratio=0.25, bits=4) as cache:
            out = model.generate(**inputs, max_new_tokens=256, cache=cache)

    The prompt is evicted by `EvictionLayer` (the same policy as `EvictionCache`, chunked prefill included); decoding
    replaces, each step, the slot the policy ranks lowest by the token leaving the ring (`eviction/fixed_slot.py`).
    Sliding/chunked layers (Gemma 3) are the static cache's compileable `StaticSlidingWindowKVLayer`.

    Args:
        model: the `PreTrainedModel` that runs the cache (sdpa or eager attention; the cache attaches to it through
            `kvpress_lite.attention_bridge`; `detach()` or leaving `with` restores it).
        policy: one of "h2o", "tova", "snapkv", "knorm", "streaming", "random".
        budget / ratio: tokens kept per (row, kv head) between steps, ring included, or that fraction of the prompt
            (exactly one); a step attends to them and the incoming token.
        sinks: first real tokens never evicted. recent: the most recent tokens, never evicted, kept in the
            full-precision ring of `recent + 1` entries (as `EvictionCache`'s `recent`, they count in the budget).
        slack: the prompt's eviction slack (see `EvictionBudget`; None: `min(16, budget // 32)`, as
            `EvictionCache`). Decoding has none, but as `EvictionCache`'s protected window swings between `recent`
            and `recent + slack` tokens, the ring protects `recent + slack // 2` (within the budget); `slack=0`:
            exactly `EvictionCache(slack=0)`.
        bits: None (slots in the model dtype), 8 or 4 (slots as KIVI codes with per-token keys and values).
        group_size: channels per quantization group (divides head_dim).
        bf16_kernel: with `bits=None`, decode steps on CUDA run the Triton kernel over the full-precision slots (its
            residual path, output and probabilities in one pass) instead of the torch step (matmul, softmax,
            matmul, compiled with the step); off by default: not measured yet. Quantized slots always use the kernel
            on CUDA.
        kernel_impl: "auto" (the Triton kernel on CUDA where it applies, else the torch step), "sdpa" (the torch
            step everywhere: the sdpa path returns no probabilities), "triton" or "torch" (the fp32 reference through
            the seam; for tests).
        **policy_params: the policy's hyperparameters (`average=` for h2o, `window=`/`kernel=` for snapkv, `seed=`).
    Storage per full-attention layer: `[batch, kv_heads, budget + 1, head_dim]` keys and values (slots + ring),
    positions int32 and scores fp32 `[batch, kv_heads, budget + 1]`. Paper: H2O, https://arxiv.org/abs/2306.14048
    """

    def __init__(self, model, policy: str = "h2o", budget: int | None = None, ratio: float | None = None,
                 sinks: int = 4, recent: int = 16, slack: int | None = None, bits: int | None = None,
                 group_size: int = 32, bf16_kernel: bool = False, kernel_impl: str = "auto", **policy_params):
        if not hasattr(model, "set_attn_implementation"):
            raise ValueError(f"model must be a transformers PreTrainedModel (FixedSlotEvictionCache computes the "
                             f"decode step's attention itself), got {type(model).__name__}")
        if policy not in SUPPORTED_POLICIES:
            raise ValueError(f"policy={policy!r} is not supported by FixedSlotEvictionCache; accepted values: "
                             f"{list(SUPPORTED_POLICIES)} (EvictionCache accepts every registered policy)")
        if bits not in SUPPORTED_BITS or isinstance(bits, bool):
            raise ValueError(f"bits={bits!r} is not supported by FixedSlotEvictionCache; accepted values: "
                             f"{list(SUPPORTED_BITS)}")
        if not isinstance(recent, int) or isinstance(recent, bool) or recent < 0:
            raise ValueError(f"recent={recent!r} must be an integer >= 0 (protected tokens in the full-precision ring)")
        if isinstance(budget, int) and isinstance(sinks, int) and budget < max(sinks, 1) + recent:
            raise ValueError(f"budget={budget} must be >= max(sinks, 1) + recent = {max(sinks, 1) + recent} "
                             f"(sinks={sinks} first tokens and the recent={recent} tokens of the ring are never "
                             "evicted, and at least one slot takes the others)")
        self.policy = make_policy(policy, **policy_params)
        check_impl(kernel_impl, "kernel_impl")
        self.bf16_kernel, self.kernel_impl = bool(bf16_kernel), kernel_impl
        self.spec = EvictionBudget(budget, ratio, sinks, recent, slack)
        self.storage = StorageSpec(bits, group_size, 0, "token")
        super().__init__(model)
        self.storage.check_head_dim(self.geometry.head_dim)
        self.attachment = attention_bridge.attach(model, "FixedSlotEvictionCache")
        self._detach = weakref.finalize(self, self.attachment.detach)
        for layer in self.layers:
            if isinstance(layer, StaticSlidingWindowKVLayer):
                layer.attachment = self.attachment

    def full_attention_layer(self, layer_idx: int) -> FixedSlotLayer:
        bits = self.storage.bits
        make_store = SlotKV if bits is None else functools.partial(QuantizedSlotKV, bits=bits,
                                                                   group_size=self.storage.group_size)
        return FixedSlotLayer(self.policy, self.spec, layer_idx, make_store, bf16_kernel=self.bf16_kernel,
                              kernel_impl=self.kernel_impl)

    def uncompressed_layer(self, layer_type: str, kwargs: dict, layer_idx: int):
        """Sliding/chunked layers: the compileable `StaticSlidingWindowKVLayer` (lengths on the device)."""
        if layer_type not in ("sliding_attention", "chunked_attention"):
            return super().uncompressed_layer(layer_type, kwargs, layer_idx)
        window = kwargs["sliding_window"]
        return StaticSlidingWindowKVLayer(window, window, layer_idx, chunked=layer_type == "chunked_attention")

    def start_decoding(self) -> None:
        """Move every full-attention layer's prompt into its fixed slots now (host side; `generate` does it before
        its first decode step); e.g. before `batch_repeat_interleave`, to replicate the slots rather than the prompt."""
        for layer in self.layers:
            if isinstance(layer, FixedSlotLayer) and not layer.decoding and layer.prompt.is_initialized:
                layer.start_decoding()

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        """Before the first decode step's masks are built (outside any compiled graph), `start_decoding`; then
        transformers' sizes."""
        if query_length == 1 and not _compat.is_compiling():
            self.start_decoding()
        return super().get_mask_sizes(query_length, layer_idx)

    def detach(self) -> None:
        """Give the model back its original attention implementation (idempotent); the cache cannot run after."""
        self._detach()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.detach()




@register("fixed_slot", "eviction", "eviction into preallocated slots (h2o/tova/snapkv/knorm/streaming/random, "
          "bf16/int8/int4); compileable decode step")
def fixed_slot_cache(model, policy: str = "h2o", budget: int | None = None, ratio: float | None = None, sinks: int = 4,
                     recent: int = 16, slack: int | None = None, bits: int | None = None, group_size: int = 32,
                     average: bool | None = None, window: int | None = None, kernel: int | None = None,
                     seed: int | None = None, bf16_kernel: bool = False, kernel_impl: str = "auto"):
    """`FixedSlotEvictionCache(model, policy, ...)`; the policy's parameters (`average`, `window`, `kernel`, `seed`)
    are passed to it only when set."""
    params = {k: v for k, v in dict(average=average, window=window, kernel=kernel, seed=seed).items() if v is not None}
    return FixedSlotEvictionCache(model, policy, budget, ratio, sinks, recent, slack, bits, group_size,
                                  bf16_kernel=bf16_kernel, kernel_impl=kernel_impl, **params)
