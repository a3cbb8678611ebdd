"""Execute a recipe: plan runs, skip finished ones (resume), shard samples over accelerate processes, write results.

Works as one process or under `accelerate launch -m eval RECIPE`: every process computes the same plan and the
same samples, takes its `split_between_processes` share, records are gathered, and only the main process writes.
"""

from __future__ import annotations

import gc
import itertools
import json
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from kvpress_lite.registry import build_cache

from . import zoo
from .config import Recipe
from .env import MemoryMeter, hardware, set_seed, versions
from .execute import aggregate, compare_to_baseline, perplexity_shard, task_shard
from .perplexity import perplexity_through_cache
from .runs import Run, plan


def _device(recipe: Recipe, state) -> str:
    if recipe.device == "cuda" and state.num_processes > 1:
        return f"cuda:{state.local_process_index}"
    return recipe.device


def preflight(runs: list[Run], model) -> None:
    """Build every cache once before any compute, so bad strategy params fail in seconds, naming the cache.

    `model` may live on the `meta` device (`--dry-run`): caches need the config and the attention modules only.
    """
    for spec in {r.cache.label: r.cache for r in runs}.values():
        try:
            cache = build_cache(spec.strategy, model, **spec.params)
        except (ValueError, TypeError) as err:
            raise ValueError(f"caches: {spec.label!r} ({spec.strategy}, params={spec.params}) on {runs[0].model}: "
                             f"{err}") from None
        if hasattr(cache, "detach"):
            cache.detach()  # eviction caches hook the model's attention until detached
    gc.collect()  # caches that hook the model (eviction) let go of it when collected


@torch.no_grad()
def _warmup(run: Run, model) -> None:
    """Untimed: a prefill of the run's real shape and 4 steps through a fresh cache of its strategy."""
    part = run.part
    if run.kind == "perplexity":
        rows, prefix, chunk = 1, part.prefix_length, part.chunk_size
    else:
        rows, prefix, chunk = min(part.batch_size, part.samples), run.length, 1
    device = next(model.parameters()).device
    ids = torch.arange(prefix + 4 * chunk, device=device) * 7 % (model.config.get_text_config().vocab_size - 3) + 3
    cache = build_cache(run.cache.strategy, model, **run.cache.params)
    perplexity_through_cache(model, ids.expand(rows, -1), cache, prefix_length=prefix, chunk_size=chunk)


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    tmp.replace(path)  # atomic: a metrics.json is only ever complete


def execute(run: Run, model, tokenizer, state, output_dir: Path, device: str) -> None:
    """Run one (cell, cache) pair across all processes; the main process writes its folder."""
    from accelerate.utils import gather_object

    set_seed(run.recipe.seed)
    if run.recipe.warmup:
        _warmup(run, model)
    n = run.part.windows if run.kind == "perplexity" else run.part.samples
    shard_fn = perplexity_shard if run.kind == "perplexity" else task_shard
    start = time.perf_counter()
    with MemoryMeter(device) as memory, state.split_between_processes(list(range(n))) as mine:
        # inside the run: scored tokens (perplexity) or samples (tasks) of this process's share
        units = len(mine) * run.part.eval_length if run.kind == "perplexity" else len(mine)
        with tqdm(total=units, desc=f"  {run.cell} {run.cache.label}", unit="tok" if run.kind == "perplexity"
                  else "sample", leave=False, disable=not state.is_main_process) as inner:
            records = shard_fn(run, model, tokenizer, list(mine), progress=inner.update)
    wall = time.perf_counter() - start
    if state.num_processes > 1:
        records = gather_object(records)
        peaks = gather_object([memory.result])
    else:
        peaks = [memory.result]
    if state.is_main_process:
        records = sorted(records, key=lambda r: r["index"])
        folder = run.path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        metrics = aggregate(run, records)
        baseline_file = run.baseline().path(output_dir) / "metrics.json"
        baseline = json.loads(baseline_file.read_text()) if baseline_file.exists() else None
        metrics.update(compare_to_baseline(metrics, baseline if not run.cache.is_baseline else metrics))
        metrics.update(
            peak_memory={"kind": peaks[0]["kind"], "bytes": None if peaks[0]["bytes"] is None
                         else max(p["bytes"] for p in peaks)},
            wall_time_s=wall, seed=run.recipe.seed, config_hash=run.config_hash,
            versions=versions(), hardware=hardware(device, state.num_processes),
        )
        (folder / "config.yaml").write_text(yaml.safe_dump(run.config(), sort_keys=False))
        with open(folder / "predictions.jsonl", "w") as handle:
            handle.writelines(json.dumps(r, sort_keys=True) + "\n" for r in records)
        _write_json(folder / "metrics.json", metrics)
    gc.collect()  # release this run's caches (and any model hooks they hold) before the next run
    state.wait_for_everyone()


def process_state(recipe: Recipe):
    """accelerate's PartialState; on CPU it must be told so (gloo backend), or launched processes would not group."""
    from accelerate import PartialState

    return PartialState(cpu=recipe.device == "cpu" or not torch.cuda.is_available())


def run_recipe(recipe: Recipe, output_dir: str | Path | None = None) -> dict:
    """Run every unfinished run of `recipe`; returns `{"runs", "done", "skipped"}` folder lists (runs in plan order)."""
    state = process_state(recipe)
    threads = torch.get_num_threads()
    if recipe.num_threads is not None:
        torch.set_num_threads(recipe.num_threads)
    try:
        return _run_all(recipe, state, Path(output_dir or recipe.output_dir))
    finally:
        torch.set_num_threads(threads)  # leave the caller's process as it was


def _run_all(recipe: Recipe, state, output_dir: Path) -> dict:
    runs = plan(recipe)
    finished = {r.path(output_dir): (r.path(output_dir) / "metrics.json").exists() for r in runs}
    pending = [r for r in runs if not finished[r.path(output_dir)]]
    state.wait_for_everyone()  # everyone decided what to skip before anyone writes
    if state.is_main_process:
        (output_dir / recipe.name).mkdir(parents=True, exist_ok=True)
        (output_dir / recipe.name / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        skipped = len(runs) - len(pending)
        print(f"[eval] {recipe.name}: {len(runs)} runs, {skipped} already finished (skipped), {len(pending)} to run")
    device = _device(recipe, state)
    bar = tqdm(total=len(pending), desc=recipe.name, unit="run", disable=not state.is_main_process)
    for (model_name, dtype), group in itertools.groupby(pending, key=lambda r: (r.model, r.dtype)):
        group = list(group)
        model, tokenizer = zoo.load(model_name, dtype, device, recipe.attn_implementation)
        preflight(group, model)
        for run in group:
            bar.set_postfix_str(f"{run.cell} {run.cache.label}")
            execute(run, model, tokenizer, state, output_dir, device)
            bar.update()
        del model
    bar.close()
    return {
        "runs": [r.path(output_dir) for r in runs],
        "done": [r.path(output_dir) for r in pending],
        "skipped": [p for p, f in finished.items() if f],
    }
