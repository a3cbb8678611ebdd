"""The GPU benchmark's generate rows run end to end on a CPU toy model (`--device cpu --small`): a device call is
scarce, so a broken script must fail here, not there. Checks that every row ran and reported its fields; the
figures themselves are not asserted (benchmarks print measurements, tests check correctness)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

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

    assert [r["cache"] for r in rows] == list(GENERATE_CACHES)
    for row in rows:
        assert "error" not in row, row
        assert row["ms_per_step"] > 0 and row["warmup_s"] > 0 and row["kv_gib"] > 0
    static = [r for r in rows if "static compiled" in r["cache"]]
    assert static and all(r["fused"] for r in static)  # the compiled rows decoded through the step path
    assert "| 64 x 2 | StaticCache compiled |" in proc.stdout
