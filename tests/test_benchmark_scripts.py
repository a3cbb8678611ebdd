"""The GPU benchmark's generate rows run end to end on a CPU toy model (`--device cpu --small`): a device call is
scarce, so a broken script must fail here, not there. Checks that every row ran and reported its fields; the
figures themselves are not asserted (benchmarks print measurements, tests check correctness)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import torch

ROOT = pathlib.Path(__file__).parents[1]


def test_gpu_decode_generate_rows_run_on_cpu(tmp_path):
    out = tmp_path / "rows.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}  # this checkout
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_decode.py", "--device", "cpu", "--small", "--grid", "--generate-grid",
         "64x2", "--generate-tokens", "4", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())["generate"]
    from benchmarks.generate_steps import GENERATE_CACHES

    assert [r["cache"] for r in rows] == [*GENERATE_CACHES, "DynamicCache (again, last)"]
    for row in rows:
        assert "error" not in row, row
        assert row["ms_per_step"] > 0 and row["warmup_s"] > 0 and row["kv_gib"] > 0
        assert ("first_ms_per_step" in row) == (not row["compiled"])  # growing caches: first run reported apart
    static = [r for r in rows if "static compiled" in r["cache"]]
    assert static and all(r["fused"] for r in static)  # the compiled rows decoded through the step path
    assert "| 64 x 2 | StaticCache compiled |" in proc.stdout


def test_generate_rows_never_reuse_a_reset_dynamic_cache(monkeypatch):
    """transformers 5.17's `DynamicLayer.reset()` zeroes its tensors but keeps them; a benchmark that reset() and
    reused a DynamicCache prefilled on top of the warm-up's tokens (2L keys: the 16 GiB mask at 32k x 4). Re-created
    here on the installed version: the measured cache holds exactly prompt + new tokens."""
    from transformers.cache_utils import DynamicLayer

    from benchmarks.generate_steps import measure_generate
    from benchmarks.gpu_decode import build_model

    def reset_5_17(self):
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()

    monkeypatch.setattr(DynamicLayer, "reset", reset_5_17)
    model = build_model(2, "cpu", small=True)
    ids = torch.randint(10, 2000, (2, 48), generator=torch.Generator().manual_seed(0))
    row = measure_generate(model, ids, "DynamicCache", new_tokens=5, skip=1)
    assert "error" not in row, row
    tokens = 48 + 5 - 1  # the last generated token is never fed back
    expected = 2 * 2 * 2 * 2 * tokens * 64 * 2  # layers x (K, V) x batch x kv heads x tokens x head_dim x bf16
    assert round(row["kv_gib"] * 2**30) == expected


def test_kernel_bench_probs_runs_on_cpu_interpreted(tmp_path):
    """`benchmarks/kernel_bench.py --probs` end to end under TRITON_INTERPRET=1 at a tiny shape (`--device cpu`): every
    kernel row (without, with probabilities, with per-entry validity and probabilities) and the torch-path rows ran
    and agree with the reference; times are not asserted."""
    out = tmp_path / "probs.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "benchmarks/kernel_bench.py", "--device", "cpu", "--probs", "--shapes", "2x96", "--kv-heads",
         "2", "--q-heads", "4", "--head-dim", "32", "--residual", "16", "--group-size", "16", "--key-mode", "token",
         "--configs", "[{}]", "--bits", "4", "--rep", "1", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    names = [r["name"] for r in rows]
    assert names == ["sdpa-bf16", "torch path int4 eager", "int4", "int4+probs", "int4+positions+probs",
                     "torch path bf16 eager", "bf16 kernel (residual path)+positions+probs"], names
    assert all(r.get("ok", True) for r in rows), rows


def test_attention_products_candidates_agree_on_cpu(tmp_path):
    """`benchmarks/attention_products.py --device cpu`: every candidate way of computing a decode step's attention
    and per-slot mass over bf16 slots ran and matched the fp32 eager reference (the GPU run then only ranks them)."""
    out = tmp_path / "products.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "benchmarks/attention_products.py", "--device", "cpu", "--shapes", "2x64", "--kv-heads", "2",
         "--head-dim", "32", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())
    assert [r["candidate"] for r in rows] == ["one-pass eager", "q.K products, compiled", "slots-major, compiled",
                                             "broadcast-reduce, compiled", "sdpa + logits"]
    for row in rows:
        assert "error" not in row, row
        assert row["max_err_out"] < 5e-2 and row["max_err_mass"] < 5e-2 and row["ms"] > 0


def test_compile_check_reports_one_graph_per_step_on_cpu(tmp_path):
    """`benchmarks/compile_check.py` (generate with fullgraph=True) on the CPU toy model: the fixed-slot steps, bf16
    and int4, and the static quantized cache each compile as one graph (a graph break would raise there and be
    reported as `one_graph: false` with its reason)."""
    out = tmp_path / "compile.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    only = ["fixed-slot h2o bf16", "fixed-slot h2o int4", "ours int4 static compiled"]
    proc = subprocess.run(
        [sys.executable, "benchmarks/compile_check.py", "--device", "cpu", "--small", "--backend", "aot_eager",
         "--length", "96", "--tokens", "4", "--only", *only, "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())
    assert [r["cache"] for r in rows] == [only[2], only[0], only[1]]  # the script's order: generate_steps' rows first
    for row in rows:
        assert row["one_graph"], row
