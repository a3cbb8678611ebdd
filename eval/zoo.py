"""Models the harness can load: the embedded GGUF models (kvpress_lite.load_model) plus tiny offline test models.

`tiny-llama` / `tiny-gemma3` are random-weight models (fixed seed) with a byte-level BPE tokenizer trained on
the fly from pydoc text: built in about a second, no network, scores meaningless; used by tests and CI.
"""

from __future__ import annotations

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def tiny_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE `PreTrainedTokenizerFast` trained deterministically on the first 300k chars of pydoc."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .text_sources import pydoc_text

    text = pydoc_text()[:300_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([text[i : i + 10_000] for i in range(0, len(text), 10_000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _tiny_config(kind: str, vocab_size: int, attn_implementation: str):
    from transformers import Gemma3TextConfig, LlamaConfig

    common = dict(  # head_dim 64 so the default quantization group size (64) divides it
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1,
        head_dim=64, max_position_embeddings=16384, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        attn_implementation=attn_implementation,
    )
    if kind == "tiny-llama":
        return LlamaConfig(num_hidden_layers=2, **common)
    return Gemma3TextConfig(  # 3 sliding-window layers + 1 full layer, like Gemma 3's 5:1 pattern
        num_hidden_layers=4, sliding_window=64, layer_types=["sliding_attention"] * 3 + ["full_attention"], **common
    )


def _tiny_model(kind: str, vocab_size: int, attn_implementation: str):
    from transformers import Gemma3ForCausalLM, LlamaForCausalLM

    torch.manual_seed(0)
    cls = LlamaForCausalLM if kind == "tiny-llama" else Gemma3ForCausalLM
    return cls(_tiny_config(kind, vocab_size, attn_implementation))


TINY_MODELS = ("tiny-llama", "tiny-gemma3")


def load(name: str, dtype: str = "bfloat16", device: str = "cpu", attn_implementation: str = "sdpa"):
    """Return `(model, tokenizer)` for an embedded model, a tiny test model, a local dir or a hub id."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; accepted values: {sorted(DTYPES)}")
    if name in TINY_MODELS:
        tokenizer = tiny_tokenizer()
        model = _tiny_model(name, len(tokenizer), attn_implementation).to(device=device, dtype=DTYPES[dtype]).eval()
        return model, tokenizer
    from kvpress_lite import load_model

    return load_model(name, dtype=DTYPES[dtype], device=device, attn_implementation=attn_implementation)


def model_config(name: str):
    """The model's config without its weights (for an embedded GGUF model: parsed from the file's header)."""
    import os

    from transformers import AutoConfig

    if name in TINY_MODELS:
        return _tiny_config(name, 1024, "sdpa")
    from kvpress_lite.models import EMBEDDED_MODELS, _check_hub_source, embedded_model_path

    if name in EMBEDDED_MODELS:
        path = embedded_model_path(name)
        return AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    if not os.path.exists(os.path.expanduser(name)):
        _check_hub_source(name)
    return AutoConfig.from_pretrained(name)


def meta_model(name: str, dtype: str = "bfloat16", attn_implementation: str = "sdpa"):
    """The model built on the `meta` device from its config: every cache can be built on it, no weights are read."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; accepted values: {sorted(DTYPES)}")
    config = model_config(name)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=DTYPES[dtype])
