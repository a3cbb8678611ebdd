"""Shared fixtures: real embedded models loaded once per session, tiny random-weight models per test."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M, bf16, CPU, loaded once."""
    from kvpress_lite import load_model

    return load_model("smollm2-135m", dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def smollm2_fp32():
    """(model, tokenizer) of the real SmolLM2-135M in fp32 (bf16 greedy decoding is at its own noise floor)."""
    from kvpress_lite import load_model

    return load_model("smollm2-135m", dtype=torch.float32)


@pytest.fixture(scope="session")
def gemma3():
    """(model, tokenizer) of the real Gemma-3-270M (hybrid sliding/full attention), fp32, CPU, loaded once."""
    from kvpress_lite import load_model

    return load_model("gemma3-270m", dtype=torch.float32)


def tiny_llama(attn_implementation: str = "sdpa", dtype=torch.float32, seed: int = 0):
    """A 2-layer random-weight Llama (4 heads, 2 KV heads, head_dim 16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, attn_implementation=attn_implementation,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gemma3(attn_implementation: str = "sdpa", dtype=torch.float32, seed: int = 0):
    """A 4-layer random-weight Gemma 3 text model: 3 sliding (window 8) + 1 full layer, head_dim 16."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=8, max_position_embeddings=512,
        layer_types=["sliding_attention"] * 3 + ["full_attention"], attn_implementation=attn_implementation,
    )
    return Gemma3ForCausalLM(config).to(dtype).eval()
