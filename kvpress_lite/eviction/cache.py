"""`EvictionCache`: a KV cache keeping a fixed budget of tokens per layer, ranked by a policy, optionally quantized."""

from __future__ import annotations

import weakref

from .. import attention_bridge
from .._compat import decoder_config, layer_specs
from ..cache import CompressedCache
from ..kernels import fused as fused_path
from ..storage import StorageSpec
from .adaptive import AdaptiveEvictionLayer, check_adaptive, pyramid_shares
from .layer import EvictionLayer
from .policy import EvictionBudget, make_policy
from .reread import RereadHook

# Storage defaults (bits=None, group_size=32, residual_length=8, key_mode="token") were chosen by measurement
# (docs/composition.md): per-token keys, so eviction gathers codes; groups of 32 channels (64 cost int4 up to +2.5%
# perplexity over bf16 eviction on SmolLM2); an 8-token full-precision window, so int4 storage stays >= 2.5x smaller
# than bf16 down to 256-token budgets.


class EvictionCache(CompressedCache):
    """Evicting KV cache: full-attention layers keep `budget` tokens chosen by `policy`; sliding layers keep
    transformers' window. Memory is really freed (kept slots are gathered into new tensors). With `bits` the kept
    slots are also stored quantized (KIVI codes with per-token keys, a full-precision recent window).

    Example: `model.generate(**inputs, cache=EvictionCache(model, policy="snapkv", ratio=0.25, bits=4))`.

    The cache attaches to `model`'s attention through `kvpress_lite.attention_bridge` (a wrapper of its sdpa or eager
    implementation), which hands the queries and mask to the policy; `detach()` or leaving `with cache:` restores it
    (garbage collection too, as a backstop). While no cache layer is pending the wrapper returns exactly what the
    original returns, so the model behaves the same with any other cache meanwhile.

    Fused decoding: with `bits`, decoding forwards on CUDA run the Triton kernel over the packed kept slots instead of
    attention over a dequantized copy (`fused=None`, default): any forward of q <= 16 tokens for policies that need no
    attention (knorm, streaming, random); one-token decode steps for attention-ranked policies that sum attention
    (h2o, tova, snapkv), whose scores then come from the kernel's per-slot probabilities of the same pass.

    Args:
        model: the `PreTrainedModel` that will run with this cache (decoder-only, sdpa or eager attention, no MLA).
        policy: a name in `kvpress_lite.eviction.POLICIES`: "h2o", "tova", "snapkv", "knorm", "streaming", "random".
        budget / ratio / sinks / recent / slack: see `EvictionBudget` (exactly one of budget and ratio).
        bits: None (full precision, default) or 8, 4, 2: quantize the kept slots (see `storage.StorageSpec`).
        group_size / residual_length / key_mode: quantization layout when `bits` is set (defaults: 32, 8, "token";
            "channel" keys re-quantize the kept history at each eviction, see docs/composition.md).
        fused: None (auto: on CUDA with triton), True (always, `kernel_impl` on CPU), False (never); see above.
        kernel_impl: "auto", "triton" or "torch", for the fused op.
        adaptive: per-head budgets (AdaKV): a layer keeps `budget x kv_heads` slots per row, spread over its kv heads
            by score, in a flat slot pool whose bytes follow the kept slots (`AdaptiveEvictionLayer`); needs a policy
            with `per_head = True` (not streaming, random, tova). Attention then runs a masked path (never fused).
        head_floor: with `adaptive`, the fraction in [0, 1] of the per-head budget every head keeps (AdaKV: 0.2).
        pyramid_beta: with `adaptive`, PyramidKV layer budgets (arXiv 2406.02069): full-attention layers get budgets
            falling linearly from `2 - 1/beta` to `1/beta` times the budget, bottom to top (same total); None: uniform.
        **policy_params: the policy's hyperparameters (e.g. `window=`, `kernel=` for snapkv, `seed=` for random).
    Storage per full-attention layer: `[batch, kv_heads, P, head_dim]` slots with P <= budget + slack.
    """

    def __init__(self, model, policy: str = "h2o", budget: int | None = None, ratio: float | None = None,
                 sinks: int = 4, recent: int = 16, slack: int | None = None, bits: int | None = None,
                 group_size: int = 32, residual_length: int = 8, key_mode: str = "token", fused: bool | None = None,
                 kernel_impl: str = "auto", adaptive: bool = False, head_floor: float = 0.2,
                 pyramid_beta: float | None = None, **policy_params):
        if not hasattr(model, "set_attn_implementation"):
            raise ValueError(
                f"model must be a transformers PreTrainedModel (EvictionCache observes its attention), got "
                f"{type(model).__name__}"
            )
        fused_path.check_options(fused, kernel_impl)
        self.policy = make_policy(policy, **policy_params)
        self.budget_spec = EvictionBudget(budget, ratio, sinks, recent, slack)
        self.storage = StorageSpec(bits, group_size, residual_length, key_mode)
        if not isinstance(adaptive, bool):
            raise ValueError(f"adaptive={adaptive!r} must be True (per-head budgets, AdaKV) or False (uniform)")
        self.adaptive, self.head_floor = adaptive, head_floor
        if adaptive:
            check_adaptive(self.policy, head_floor, self.storage)
        if pyramid_beta is not None and not adaptive:
            raise ValueError(f"pyramid_beta={pyramid_beta!r} needs adaptive=True (layers of unequal lengths attend "
                             "through the per-head masked path); accepted with adaptive=False: None")
        self._shares = None
        if pyramid_beta is not None:
            n_full = layer_specs(decoder_config(model))[0].count("full_attention")
            self._shares = iter(pyramid_shares(n_full, pyramid_beta))
        self.policy.prepare(model)
        super().__init__(model)
        self.storage.check_head_dim(self.geometry.head_dim)
        self.attachment = attention_bridge.attach(model, "EvictionCache")
        self._detach = weakref.finalize(self, self.attachment.detach)  # backstop: detach() / `with` is the scope
        self._reread = None
        if self.policy.rereads:  # KVzip: re-read the prompt before the first decoding forward (eviction/reread.py)
            hook = RereadHook(model, self, self.policy.chunk_size, self.policy.layerwise)
            self._reread = weakref.finalize(self, hook.remove)
        if self.storage.quantized and self.storage.key_mode == "token" and fused_path.wants_bridge(fused, model):
            for layer in self.layers:
                if isinstance(layer, EvictionLayer):
                    layer.fused_decode = (self.attachment, kernel_impl)

    def full_attention_layer(self, layer_idx: int) -> EvictionLayer | AdaptiveEvictionLayer:
        if self.adaptive:
            share = 1.0 if self._shares is None else next(self._shares)
            return AdaptiveEvictionLayer(self.policy, self.budget_spec, layer_idx, self.storage, self.head_floor, share)
        return EvictionLayer(self.policy, self.budget_spec, layer_idx, self.storage)

    def detach(self) -> None:
        """Give the model back its original attention implementation and remove the re-read hook if any (idempotent);
        the cache cannot run after."""
        self._detach()
        if self._reread is not None:
            self._reread()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def metadata_nbytes(self) -> int:
        """Bytes kept besides keys and values: slot positions, policy scores, pad counts."""
        return sum(layer.metadata_nbytes() for layer in self.layers
                   if isinstance(layer, (EvictionLayer, AdaptiveEvictionLayer)))


class HeavyHitterCache(EvictionCache):
    """H2O heavy-hitter cache: `EvictionCache(model, policy="h2o", ...)` (arXiv 2306.14048).

    Keeps the tokens with the largest attention mass accumulated over all queries so far, plus `sinks` first and
    `recent` last tokens. Takes every keyword of `EvictionCache` but `policy` (forwarded as they are, so none can be
    lost), and H2O's own `average=True`: rank by mean attention per query that saw the token instead of the sum (no
    bias toward old tokens, see `H2OPolicy`).
    """

    def __init__(self, model, budget: int | None = None, ratio: float | None = None, **kwargs):
        if "policy" in kwargs:
            raise ValueError(f"HeavyHitterCache always uses policy='h2o' (got policy={kwargs['policy']!r}); use "
                             "EvictionCache(model, policy=...) for another policy")
        super().__init__(model, "h2o", budget=budget, ratio=ratio, **kwargs)
