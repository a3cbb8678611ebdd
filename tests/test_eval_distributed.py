"""`accelerate launch` with 2 CPU processes (gloo) shards samples and gathers the same metrics as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from eval.config import load_recipe
from eval.runner import run_recipe

ROOT = Path(__file__).resolve().parent.parent
TIMING = ("prefill_tokens_per_s", "decode_tokens_per_s", "wall_time_s", "peak_memory", "hardware", "versions")


def _results(root: Path) -> dict:
    out = {}
    for f in sorted(root.rglob("metrics.json")):
        metrics = json.loads(f.read_text())
        preds = [json.loads(line) for line in (f.parent / "predictions.jsonl").read_text().splitlines()]
        out[str(f.parent.relative_to(root))] = (
            {k: v for k, v in metrics.items() if k not in TIMING},
            [{k: v for k, v in p.items() if k not in TIMING} for p in preds],
            metrics["hardware"]["num_processes"],
        )
    return out


def test_two_processes_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_recipe(load_recipe(ROOT / "recipes" / "smoke.yaml"), one)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", "29533"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, "-m", "eval", "recipes/smoke.yaml", f"output_dir={two}", "--no-report"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _results(one), _results(two)
    assert a.keys() == b.keys() and len(a) == 6
    for key in a:
        assert a[key][0] == b[key][0], key
        assert a[key][1] == b[key][1], key
        assert (a[key][2], b[key][2]) == (1, 2)
