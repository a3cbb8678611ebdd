#!/usr/bin/env bash
# The GPU measurements of docs/static-cache.md and docs/kernels.md, in steps that each fit a 10-minute call on one
# H100/H200 with torch, transformers and triton preinstalled (the package is pure Python: PYTHONPATH=. is enough).
# Results (JSON + logs) go to $OUT (or ./gpu-out). Usage: bash benchmarks/gpu_session.sh STEP [SHAPES], STEP one of:
#   tests     the CUDA tests: kernels at real shapes (eager and valid-length mode under a CUDA graph), the fused
#             QuantizedKVCache, StaticQuantizedKVCache compiled by generate (inductor, CUDA graphs; int4 then int8
#             in one process), the seam's eager implementation choice                                 (~3 min)
#   kernel    the decode kernel alone at 32k x 8 against SDPA over bf16 and the copy bandwidth          (~2 min)
#   generate  decode steps through generate: DynamicCache (first and again last), QuantizedKVCache int4,
#             StaticCache compiled, StaticQuantizedKVCache int4/int8 compiled at 8k x 1, 8k x 8, 32k x 4
#             (compile time and growing caches' first run apart)                                       (~9 min)
#   decode    decode forwards timed alone for every cache (kernel v3), 4 grid points                    (~8 min)
#   peak      peak memory of a chunked prefill at 32k x 1 (4096-token chunks), DynamicCache vs int4     (~2 min)
#   capacity  largest batch at 32k and its throughput                                                 (~8 min)
#   probs     issue 18 item 2: the kernel with / without probabilities at the fixed-slot storage (per-token keys,
#             G 32, ring 16) and at 32k x 8 (channel keys, G 64), against the fixed-slot torch path (eager, compiled);
#             its CUDA tests are in `tests` (tests/test_decode_probs.py -k cuda)              (not timed yet)
#   products  one decode step's attention + per-slot mass over bf16 slots, six ways (benchmarks/attention_products.py):
#             which replaces the slow batched products of the bf16 fixed-slot and one-pass eager steps    (~1 min)
#   compile   does each compiled cache's decode step compile as one graph with inductor on this GPU (fullgraph=True:
#             the first graph break raises and is printed; benchmarks/compile_check.py, 2 layers)       (~3 min)
#   eviction  issue 18's eviction rows with profiles (docs/fixed-slot-eviction.md): SHAPES (default 8192x8) through
#             benchmarks/eviction_decode.py --uncompiled h2o snapkv --profile-steps 3, with dynamo's graph breaks and
#             inductor's CUDA-graph decisions logged (TORCH_LOGS=graph_breaks,perf_hints): why the int4 fixed-slot
#             step ran as 4 graphs per layer                                   (8k x 8 ~6 min; 32k x 4 ~9 min alone)
#   fixed     issue 18's fixed-slot rows as measured on 2026-12-07 (docs/fixed-slot-eviction.md, third session): SHAPES
#             (default 32768x4) with DynamicCache (first, last), StaticCache compiled, fixed-slot tova bf16 and int4 at
#             ratio 0.25                                                                   (32k x 4 ~5 min, 8k x 1 + 8k x 8 ~7)
#   uncompiled  the uncompiled EvictionCache rows alone: SHAPES (default 8192x8), DynamicCache first and last, h2o and
#             snapkv at ratio 0.25, bf16 and int4 (no StaticCache, no fixed-slot row)                  (not timed yet)
# transformers' quanto cache (the "QuantizedCache quanto int4" rows of `decode`) needs optimum-quanto, which the GPU image
# lacks: carry its wheel (device README, ".whl") or that row reports an import error and the others run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=${OUT:-gpu-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
# SHAPES of a step: its arguments after the step's name, else the default given as one word list; the file tag
shapes_and_tag() {
  local default=$1; shift
  shapes=("$@")
  [ ${#shapes[@]} -gt 0 ] || read -ra shapes <<< "$default"
  tag=$(IFS=_; echo "${shapes[*]}")
}
step=${1:?usage: gpu_session.sh tests|kernel|generate|decode|peak|capacity|probs|products|compile|eviction|fixed|uncompiled}
case $step in
  tests)
    python -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_static_cache.py \
      tests/test_attention_bridge.py tests/test_decode_seam.py tests/test_decode_probs.py -k "gpu or cuda" 2>&1 \
      | tee "$out/tests.log" ;;
  kernel)
    python benchmarks/kernel_bench.py --quick --json "$out/kernel.json" 2>&1 | tee "$out/kernel.log" ;;
  generate)  # optional shapes after the step name (e.g. `generate 32768x4`) to split it over two calls
    shapes_and_tag "8192x1 8192x8 32768x4" "${@:2}"
    python benchmarks/gpu_decode.py --grid --generate-grid "${shapes[@]}" --json "$out/generate_$tag.json" \
      2>&1 | tee "$out/generate_$tag.log" ;;
  decode)
    python benchmarks/gpu_decode.py --grid 8192x1 8192x8 32768x1 32768x4 --json "$out/decode.json" \
      2>&1 | tee "$out/decode.log" ;;
  peak)
    python benchmarks/gpu_decode.py --grid 32768x1 --prefill-chunk 4096 --caches DynamicCache "ours int4" \
      --json "$out/peak.json" 2>&1 | tee "$out/peak.log" ;;
  capacity)
    python benchmarks/gpu_decode.py --grid 32768x1 --caches DynamicCache "ours int8" "ours int4" \
      --capacity-length 32768 --json "$out/capacity.json" 2>&1 | tee "$out/capacity.log" ;;
  probs)
    python benchmarks/kernel_bench.py --probs --key-mode token --group-size 32 --residual 16 \
      --shapes 8x2048 1x2048 8x8192 --configs '[{}]' --json "$out/probs_fixed_slot.json" 2>&1 \
      | tee "$out/probs_fixed_slot.log"
    python benchmarks/kernel_bench.py --probs --shapes 8x32768 --json "$out/probs_32k.json" 2>&1 \
      | tee "$out/probs_32k.log" ;;
  products)
    python benchmarks/attention_products.py --json "$out/products.json" 2>&1 | tee "$out/products.log" ;;
  compile)
    TORCH_LOGS=graph_breaks python benchmarks/compile_check.py "${@:2}" --json "$out/compile.json" 2>&1 \
      | tee "$out/compile.log" ;;
  eviction)
    shapes_and_tag "8192x8" "${@:2}"
    TORCH_LOGS=graph_breaks,perf_hints python benchmarks/eviction_decode.py --grid "${shapes[@]}" \
      --uncompiled h2o snapkv --flat-lengths --capacity-length 0 --profile-steps 3 --json "$out/eviction_$tag.json" \
      2>&1 | tee "$out/eviction_$tag.log" ;;
  fixed)
    shapes_and_tag "32768x4" "${@:2}"
    python benchmarks/eviction_decode.py --policy tova --grid "${shapes[@]}" --kinds bf16 int4 --flat-lengths \
      --capacity-length 0 --json "$out/fixed_$tag.json" 2>&1 | tee "$out/fixed_$tag.log" ;;
  uncompiled)
    shapes_and_tag "8192x8" "${@:2}"
    python benchmarks/eviction_decode.py --grid "${shapes[@]}" --kinds --no-static --uncompiled h2o snapkv \
      --flat-lengths --capacity-length 0 --json "$out/uncompiled_$tag.json" 2>&1 | tee "$out/uncompiled_$tag.log" ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
