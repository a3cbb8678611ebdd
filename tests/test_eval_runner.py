"""End to end on the tiny random model: run folders, metrics, resume, and determinism of reruns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from eval.config import load_recipe
from eval.runner import run_recipe

SMOKE = Path(__file__).resolve().parent.parent / "recipes" / "smoke.yaml"
TIMING = ("prefill_tokens_per_s", "decode_tokens_per_s", "wall_time_s", "peak_memory", "hardware", "versions")


def metrics_by_run(root: Path) -> dict:
    return {str(f.parent.relative_to(root)): json.loads(f.read_text()) for f in sorted(root.rglob("metrics.json"))}


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    recipe = load_recipe(SMOKE)
    return recipe, out, run_recipe(recipe, out)


def test_run_folders_hold_config_predictions_metrics(smoke_run):
    recipe, out, result = smoke_run
    assert len(result["done"]) == 6 and result["skipped"] == []
    for folder in result["runs"]:
        assert folder.parent.parent.parent == out / "smoke"  # <out>/<recipe>/<model>/<cell>/<label>-<hash>
        config = yaml.safe_load((folder / "config.yaml").read_text())
        metrics = json.loads((folder / "metrics.json").read_text())
        lines = (folder / "predictions.jsonl").read_text().splitlines()
        assert folder.name == f"{config['cache']['label']}-{metrics['config_hash']}"
        assert len(lines) == (2 if config["kind"] == "perplexity" else 4)
        assert {"torch", "transformers", "kvpress_lite", "git_sha"} <= set(metrics["versions"])
        assert metrics["hardware"]["cpu"] and metrics["seed"] == 0 and metrics["wall_time_s"] > 0
        assert metrics["peak_memory"] == {"kind": None, "bytes": None}  # no process-wide peak on CPU
        assert metrics["kv_bytes_max"] >= metrics["kv_bytes"] > 0  # the cache's own peak, sampled per forward
        assert metrics["prefill_tokens_per_s"] > 0 and metrics["decode_tokens_per_s"] > 0
        assert metrics["kv_bytes"] > 0


def test_ratios_are_measured_against_the_dynamic_run(smoke_run):
    _, out, _ = smoke_run
    runs = metrics_by_run(out)
    for cell in ("ppl-192+64", "passkey-320"):
        dynamic = next(m for k, m in runs.items() if f"/{cell}/dynamic-" in k)
        int4 = next(m for k, m in runs.items() if f"/{cell}/int4-" in k)
        assert dynamic["kv_ratio_vs_dynamic"] == 1.0
        assert int4["kv_ratio_vs_dynamic"] == pytest.approx(int4["kv_bytes"] / dynamic["kv_bytes"])
        assert int4["kv_ratio_vs_dynamic"] < 0.8 and int4["cache_tokens"] == dynamic["cache_tokens"]
    ppl = next(m for k, m in runs.items() if "/ppl-192+64/int4-" in k)
    dyn = next(m for k, m in runs.items() if "/ppl-192+64/dynamic-" in k)
    assert ppl["perplexity_delta_vs_dynamic"] == pytest.approx(ppl["perplexity"] - dyn["perplexity"])
    assert ppl["perplexity_change_vs_dynamic"] == pytest.approx(ppl["perplexity"] / dyn["perplexity"] - 1)
    task = next(m for k, m in runs.items() if "/passkey-320/int4-" in k)
    assert 0.0 <= task["score"] <= 1.0 and set(task["score_by_depth"]) == {"0.25", "0.75"}


def test_resume_skips_finished_runs(smoke_run):
    recipe, out, first = smoke_run
    stamps = {p: (p / "metrics.json").stat().st_mtime_ns for p in first["runs"]}
    again = run_recipe(recipe, out)
    assert again["done"] == [] and sorted(again["skipped"]) == sorted(first["runs"])
    assert stamps == {p: (p / "metrics.json").stat().st_mtime_ns for p in first["runs"]}
    changed = run_recipe(load_recipe(SMOKE, ["tasks.passkey.samples=2", "perplexity=null"]), out)
    assert len(changed["done"]) == 3 and changed["skipped"] == []  # a new config hash: new folders


def test_rerun_gives_identical_metrics(smoke_run, tmp_path):
    recipe, out, first = smoke_run
    run_recipe(recipe, tmp_path)
    a, b = metrics_by_run(out / "smoke"), metrics_by_run(tmp_path / "smoke")
    a = {k: v for k, v in a.items() if k in b}  # the resume test may have added runs
    assert a.keys() == b.keys() and len(b) == 6
    assert without_timings(list(a.values())) == without_timings(list(b.values()))
    for key in b:
        pa = [json.loads(line) for line in (out / "smoke" / key / "predictions.jsonl").read_text().splitlines()]
        pb = [json.loads(line) for line in (tmp_path / "smoke" / key / "predictions.jsonl").read_text().splitlines()]
        assert without_timings(pa) == without_timings(pb)


def test_left_padded_batches_generate_like_batch_one(smoke_run, tmp_path):
    _, _, first = smoke_run
    single = run_recipe(load_recipe(SMOKE, ["tasks.passkey.batch_size=1", "perplexity=null"]), tmp_path)
    for folder in single["runs"]:
        label = folder.name.rsplit("-", 1)[0]
        batched = next(p for p in first["runs"] if p.name.rsplit("-", 1)[0] == label and "passkey" in str(p))
        one = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
        two = [json.loads(line) for line in (batched / "predictions.jsonl").read_text().splitlines()]
        assert {r["batch_rows"] for r in two} == {2}
        assert len({r["prompt_tokens"] for r in two}) > 1  # rows of different lengths: left padding happened
        assert [r["generation"] for r in one] == [r["generation"] for r in two], folder.name


def test_progress_moves_inside_each_run(tmp_path, monkeypatch):
    """Besides the bar over runs, each run has a bar that moves per scored token (perplexity) or per sample (tasks)."""
    import eval.runner as runner

    bars = []

    class Recorder:
        def __init__(self, total=None, desc="", unit="it", **kwargs):
            self.desc, self.total, self.unit, self.updates = desc, total, unit, []
            bars.append(self)

        def update(self, n=1):
            self.updates.append(n)

        def set_postfix_str(self, text):
            pass

        def close(self):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(runner, "tqdm", Recorder)
    recipe = load_recipe(SMOKE, ["caches.int4=null", "caches.h2o=null", "tasks.passkey.samples=2", "warmup=false"])
    run_recipe(recipe, tmp_path)
    outer, inner = bars[0], {b.desc.split()[0]: b for b in bars[1:]}
    assert outer.unit == "run" and sum(outer.updates) == outer.total == 2
    ppl, task = inner["ppl-192+64"], inner["passkey-320"]
    assert ppl.unit == "tok" and ppl.total == 2 * 64 and sum(ppl.updates) == 128 and len(ppl.updates) == 2 * 9
    assert task.unit == "sample" and task.total == 2 and task.updates == [2]  # one batch of 2
