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


def tiny_llama(attn_implementation: str = "sdpa", dtype=torch.float32, seed: int = 0, num_layers: int = 2,
               **config):
    """A random-weight Llama (4 heads, 2 KV heads, head_dim 16), 2 layers unless `num_layers`; `config` overrides."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    defaults = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=512)
    config = LlamaConfig(num_hidden_layers=num_layers, attn_implementation=attn_implementation,
                         **{**defaults, **config})
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gemma3(attn_implementation: str = "sdpa", dtype=torch.float32, seed: int = 0, **config):
    """A random-weight Gemma 3 text model, head_dim 16: 3 sliding (window 8) + 1 full layer unless `config` overrides
    (e.g. `num_hidden_layers=6, layer_types=[...]`)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    defaults = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, sliding_window=8, num_hidden_layers=4,
                    layer_types=["sliding_attention"] * 3 + ["full_attention"], max_position_embeddings=512)
    config = Gemma3TextConfig(attn_implementation=attn_implementation, **{**defaults, **config})
    return Gemma3ForCausalLM(config).to(dtype).eval()


def left_padded_prompt(batch: int = 2, length: int = 40, pad: int = 5, seed: int = 1):
    """Random token ids `[batch, length]` (vocabulary 128) and their attention mask, rows after the first left-padded
    by `pad` tokens."""
    torch.manual_seed(seed)
    ids = torch.randint(0, 128, (batch, length))
    mask = torch.ones_like(ids)
    mask[1:, :pad] = 0
    return ids, mask


def padded_batch(length: int = 12, pad: int = 4, seed: int = 0, vocab: int = 128):
    """Batch 2, row 1 left-padded with `pad` pad tokens (id 0; a generator, so the global seed is untouched):
    (input_ids, attention_mask)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, length), generator=gen)
    mask = torch.ones(2, length, dtype=torch.long)
    ids[1, :pad], mask[1, :pad] = 0, 0
    return ids, mask


def greedy_with_logits(model, cache, ids, mask, new_tokens: int, **kwargs):
    """Greedy `generate` of `new_tokens` through `cache`: (sequences, logits `[new_tokens, batch, vocab]`)."""
    from kvpress_lite._compat import cache_kwarg

    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, **{cache_kwarg(model): cache}, **kwargs)
    return out.sequences, torch.stack(out.logits)
