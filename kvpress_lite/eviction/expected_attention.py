"""Expected Attention: rank keys by the attention that the queries expected next would give them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._compat import attention_scale, rope_inv_freq
from .policy import EvictionPolicy, ScoreInputs
from .registration import register_policy


def average_rotation(inv_freq: torch.Tensor, window: int, n_future: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(cos, sin)` `[window, head_dim // 2]`: RoPE rotation averaged over the future positions, for each query of a
    window of `window` consecutive queries (query i, the last at L - 1, is `window - i` positions before L; the
    future positions are L .. L + n_future - 1, so its shifts are `window - i + j`, j < n_future)."""
    arange = lambda *a: torch.arange(*a, dtype=torch.float64, device=inv_freq.device)  # noqa: E731
    shifts = arange(window, 0, -1)[:, None] + arange(n_future)[None, :]  # (w, F)
    angles = shifts[..., None] * inv_freq.double()[None, None, :]  # (w, F, D/2)
    return angles.cos().mean(1).float(), angles.sin().mean(1).float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply per-frequency rotations (`cos`/`sin` `[n, D/2]`) to `x` `[..., n, D]` in transformers' rotate_half
    layout (channel k pairs with k + D/2); averaged rotations shrink as well as rotate."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@register_policy("expected_attention", "Expected Attention: attention expected from future queries' statistics")
@dataclass
class ExpectedAttentionPolicy(EvictionPolicy):
    """Expected Attention, Devoto et al. 2025, https://arxiv.org/abs/2510.00636 (kvpress `ExpectedAttentionPress`).

    The queries that will come next are modelled as Gaussian, `q ~ N(mu, Sigma)`, from the layer's `window` most recent
    rotated queries, each moved to the future by the RoPE rotation averaged over the next `n_future` positions. A
    key's expected attention weight is then `E[exp(q.k * s)] = exp(mu.k * s + k^T Sigma k * s^2 / 2)` (s: the model's
    attention scale, 1/sqrt(D) for Llama);
    scores are these softmax-normalised over the cached keys per query head, averaged over the query heads of each kv
    head, times the value norm (`(p + epsilon) * ||v||`, kvpress' default).

    Needs no attention weights (only the queries, kept by the layer): it runs under SDPA, and scores only when the
    layer evicts; the layer keeps the queries seen since its last eviction (at most `window`), so a decoding eviction
    models the future from the queries decoded since the previous one. Unlike kvpress (statistics from hidden states
    through W_q, so no QK-norm models), it reads the model's real rotated queries, so it also runs on Gemma 3.
    Cost per eviction and kv head: one `[P, D] x [D, D]` product per query head for the covariance term
    (`use_covariance`), no extra forward. Memory: up to `window` queries per layer `[B, H_q, window, D]` between
    evictions (dropped by each eviction), counted in the cache's metadata bytes.

    Args:
        window: most recent queries whose statistics model the future queries (kvpress: the whole prompt).
        n_future: future positions the RoPE rotation is averaged over (kvpress: 512).
        use_covariance: add the covariance term (else the mean query alone).
        use_vnorm: weight by the value norm.
        epsilon: added to the normalised expected attention before the value weighting.
    """

    window: int = 128
    n_future: int = 512
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0
    _inv_freq: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _scale: float | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("window", "n_future"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        for name in ("use_covariance", "use_vnorm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        if not isinstance(self.epsilon, (int, float)) or isinstance(self.epsilon, bool) or self.epsilon < 0:
            raise ValueError(f"epsilon={self.epsilon!r} must be a number >= 0")

    @property
    def query_window(self) -> int:
        return self.window

    def prepare(self, model) -> None:
        """Read the full-attention layers' RoPE frequencies (None: no RoPE, queries used as they are) and the
        attention's softmax scale (None: 1/sqrt(head_dim))."""
        self._inv_freq = rope_inv_freq(model, "full_attention")
        self._scale = attention_scale(model)

    def statistics(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(mu [B, H_q, D], Sigma [B, H_q, D, D] or None)` of the future queries from `[B, H_q, w, D]` recent ones."""
        q = queries.float()
        w, D = q.shape[-2], q.shape[-1]
        if self._inv_freq is not None and self._inv_freq.numel() == D // 2:
            cos, sin = average_rotation(self._inv_freq, w, self.n_future)
            q = rotate(q, cos.to(q.device), sin.to(q.device))
        mu = q.mean(dim=2)
        if not self.use_covariance:
            return mu, None
        centred = q - mu[:, :, None]
        return mu, centred.transpose(-1, -2) @ centred / w

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """`[batch, kv_heads, P]` expected attention (softmax over the P keys, mean over each kv head's query heads),
        times the value norm; keys' L2 norm ranking (knorm) if no query has been seen yet."""
        keys = inputs.keys.float()  # (B, Hkv, P, D)
        if inputs.queries is None:
            return -keys.norm(dim=-1)
        B, Hkv, P, D = keys.shape
        mu, sigma = self.statistics(inputs.queries)  # (B, Hq, D), (B, Hq, D, D)
        G = mu.shape[1] // Hkv
        scale = D**-0.5 if self._scale is None else self._scale
        grouped = keys[:, :, None].expand(B, Hkv, G, P, D).reshape(B, Hkv * G, P, D)  # query head h -> kv head h // G
        logits = (grouped @ mu[..., None]).squeeze(-1) * scale  # (B, Hq, P)
        if sigma is not None:
            logits = logits + ((grouped @ sigma) * grouped).sum(-1) * (scale**2 / 2)
        if inputs.valid is not None:  # per-head view of unequal heads: padding entries take no probability
            logits = logits.masked_fill(~inputs.valid.repeat_interleave(G, dim=1), float("-inf"))
        expected = logits.softmax(dim=-1).view(B, Hkv, G, P).mean(2)  # (B, Hkv, P)
        if self.use_vnorm:
            expected = (expected + self.epsilon) * inputs.values.float().norm(dim=-1)
        return expected
