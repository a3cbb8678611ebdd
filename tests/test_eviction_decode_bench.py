"""`benchmarks/eviction_decode.py` runs end to end on a CPU toy model (`--device cpu --small`, aot_eager): every row
(generate grid, flatness, capacity) ran and reported its fields, and the fixed-slot rows really decoded through the
compiled fixed-slot cache. Figures are not asserted (a shared CPU measures nothing)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]


def test_eviction_decode_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "rows.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}  # this checkout
    proc = subprocess.run(
        [sys.executable, "benchmarks/eviction_decode.py", "--device", "cpu", "--small", "--grid", "128x2",
         "--flat-lengths", "128", "256", "--flat-budget", "32", "--flat-batch", "1", "--capacity-length", "128",
         "--max-batch", "2", "--tokens", "4", "--uncompiled", "h2o", "--kernel-rows", "int4 torch-step", "int8",
         "bf16 kernel", "--profile-steps", "2", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    grid = [r["cache"] for r in result["generate"]]
    assert grid == ["DynamicCache", "StaticCache compiled", "fixed-slot h2o 0.25 bf16 compiled",
                    "fixed-slot h2o 0.25 int4 compiled", "EvictionCache h2o 0.25 bf16", "EvictionCache h2o 0.25 int4",
                    "fixed-slot h2o 0.25 int4 torch-step compiled", "fixed-slot h2o 0.25 int8 compiled",
                    "fixed-slot h2o 0.25 bf16 kernel compiled", "DynamicCache (again, last)"]
    assert len(result["flat"]) == 4 and len(result["capacity"]) == 2
    profiled = {r["cache"]: r["profile"] for r in result["generate"] if "profile" in r}  # not the repeated DynamicCache
    assert len(profiled) == len(grid) - 1
    assert all(p["launches_per_step"] > 0 for p in profiled.values())  # CPU: top-level aten ops of a decode step
    # the compiled step runs as one graph: fewer top-level ops than the eager DynamicCache step
    compiled_ops = profiled["fixed-slot h2o 0.25 bf16 compiled"]["launches_per_step"]
    assert compiled_ops < profiled["DynamicCache"]["launches_per_step"]
    for row in result["generate"] + result["flat"] + result["capacity"]:
        assert "error" not in row, row
        assert row["ms_per_step"] > 0 and row["warmup_s"] > 0 and row["kv_gib"] > 0
    fixed = {r["cache"]: r["kv_gib"] for r in result["generate"] if "fixed-slot" in r["cache"]}
    dynamic = result["generate"][0]["kv_gib"]
    assert fixed["fixed-slot h2o 0.25 bf16 compiled"] < 0.4 * dynamic  # budget 32 of 128 + 4 tokens
    assert fixed["fixed-slot h2o 0.25 int4 compiled"] < fixed["fixed-slot h2o 0.25 bf16 compiled"]
    uncompiled = {r["cache"]: r for r in result["generate"] if r["cache"].startswith("EvictionCache")}
    assert all(not r["compiled"] and r["first_ms_per_step"] > 0 for r in uncompiled.values())
    assert uncompiled["EvictionCache h2o 0.25 bf16"]["kv_gib"] < 0.4 * dynamic
    flat = {(r["cache"], r["length"]): r["kv_gib"] for r in result["flat"]}
    assert flat[("fixed-slot h2o 32 bf16 compiled", 128)] == flat[("fixed-slot h2o 32 bf16 compiled", 256)]
    assert "| 128 x 2 | fixed-slot h2o 0.25 int4 compiled |" in proc.stdout and "tokens/s" in proc.stdout


def test_eviction_decode_uncompiled_rows_alone(tmp_path):
    """`--kinds` with no kind and `--no-static`: only DynamicCache (first and last) and the uncompiled rows; a capacity
    search without a fixed-slot kind is refused by name."""
    out = tmp_path / "rows.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "benchmarks/eviction_decode.py", "--device", "cpu", "--small", "--grid", "128x2",
            "--kinds", "--flat-lengths", "--tokens", "4"]
    proc = subprocess.run(base + ["--no-static", "--uncompiled", "snapkv", "--capacity-length", "0", "--json",
                                  str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    grid = [r["cache"] for r in json.loads(out.read_text())["generate"]]
    assert grid == ["DynamicCache", "EvictionCache snapkv 0.25 bf16", "EvictionCache snapkv 0.25 int4",
                    "DynamicCache (again, last)"]
    refused = subprocess.run(base + ["--capacity-length", "128"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
    assert refused.returncode == 2 and "--capacity-length" in refused.stderr and "--kinds" in refused.stderr


def test_capacity_search_shrinks_then_grows(monkeypatch):
    """The search shrinks 12% per out-of-memory from `--max-batch` (no estimate off CUDA), then with `--capacity-grow`
    tries 15% larger batches until one does not fit: the largest batch that fit, and whether a larger one failed."""
    import argparse

    from benchmarks import eviction_decode

    limit = 200

    def fake_row(model, label, factory, compiled, length, batch, tokens, compile_config, weights):
        return None if batch > limit else dict(cache=label, length=length, batch=batch, ms_per_step=1.0)

    monkeypatch.setattr(eviction_decode, "capacity_row", fake_row)
    monkeypatch.setitem(eviction_decode.GENERATE_CACHES, "fake", (None, False))
    args = argparse.Namespace(max_batch=256, capacity_tries=5, capacity_grow=0, device="cpu", tokens=4, margin_gib=4)
    first = eviction_decode.capacity(None, "fake", 128, args, None, 0)
    assert first["tried"] == [256, 225, 198] and first["batch"] == 198 and first["upper_bound_found"]  # 225 did not
    limit = 220
    args.capacity_grow = 3
    grown = eviction_decode.capacity(None, "fake", 128, args, None, 0)
    assert grown["tried"] == [256, 225, 198, 227] and grown["batch"] == 198 and grown["upper_bound_found"]
    limit = 10_000
    capped = eviction_decode.capacity(None, "fake", 128, args, None, 0)
    assert capped["tried"] == [256] and capped["capped"] and not capped["upper_bound_found"]
    args.capacity_tries = 1
    limit = 0
    assert "out of memory" in eviction_decode.capacity(None, "fake", 128, args, None, 0)["error"]
