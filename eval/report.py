"""Reports from run folders: markdown tables, PNG plots, a `datasets` Dataset with a card (optionally pushed).

    python -m eval.report runs/                      # every recipe under runs/
    python -m eval.report runs/quickstart --push-to-hub user/kvpress-lite-quickstart
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

FIELDS = ("score", "perplexity", "perplexity_delta_vs_dynamic", "kv_bytes", "kv_ratio_vs_dynamic",
          "prefill_tokens_per_s", "decode_tokens_per_s", "wall_time_s", "cache_tokens", "n", "seed", "config_hash")


def collect(root: str | Path, run_dirs=None) -> list[dict]:
    """One flat row per finished run below `root` (folders holding metrics.json and config.yaml).

    `run_dirs` keeps only those folders; without it, runs of an older config of the same cell and label
    (another hash) are dropped in favour of the newest.
    """
    rows, files = [], sorted(Path(root).rglob("metrics.json"), key=lambda f: f.stat().st_mtime)
    if run_dirs is not None:  # keep the given order (the plan's)
        order = {Path(d).resolve(): i for i, d in enumerate(run_dirs)}
        files = sorted((f for f in files if f.parent.resolve() in order), key=lambda f: order[f.parent.resolve()])
    for metrics_file in files:
        folder = metrics_file.parent
        metrics, config = json.loads(metrics_file.read_text()), yaml.safe_load((folder / "config.yaml").read_text())
        part, cache = config[config["kind"]], config["cache"]
        row = {
            "recipe": config["recipe"], "model": part["model"], "dtype": part["dtype"], "device": config["device"],
            "kind": config["kind"], "cell": config["cell"], "task": part.get("task"), "length": part.get("length"),
            "batch_size": part.get("batch_size", 1), "label": cache["label"], "strategy": cache["strategy"],
            "params": json.dumps(cache["params"], sort_keys=True), "run_dir": str(folder.relative_to(root)),
            "recipe_dir": str(folder.parents[2]),
            "peak_memory_bytes": metrics["peak_memory"]["bytes"], "peak_memory_kind": metrics["peak_memory"]["kind"],
            **{f"version_{k}": str(v) for k, v in metrics["versions"].items()},
            **{f"hardware_{k}": str(v) for k, v in metrics["hardware"].items()},
        }
        row.update({k: metrics.get(k) for k in FIELDS})
        rows.append(row)
    if run_dirs is not None:
        return rows
    newest = {}  # rows come in execution (mtime) order; a later run of the same cell and label replaces in place
    for r in rows:
        newest[(r["recipe_dir"], r["model"], r["dtype"], r["cell"], r["label"])] = r
    return list(newest.values())


def _fmt(value, spec: str = ".3g") -> str:
    return "–" if value is None else format(value, spec)


def summary_table(rows: list[dict]) -> str:
    """Markdown: one line per cache (recipe order), one table per model/dtype. KV bytes and ratio from the perplexity
    cell (else the first task cell), tokens/s from the first task cell (`generate`; else perplexity), perplexity and
    its change vs dynamic, one score column per task cell."""
    out = []
    for model, dtype in dict.fromkeys((r["model"], r["dtype"]) for r in rows):
        group = [r for r in rows if (r["model"], r["dtype"]) == (model, dtype)]
        cells = list(dict.fromkeys(r["cell"] for r in sorted(group, key=lambda r: r["kind"] != "perplexity")))
        main, tasks = cells[0], [c for c in cells if not c.startswith("ppl-")]
        speed = tasks[0] if tasks else main  # prefer `generate` throughput over chunked perplexity feeding
        labels = list(dict.fromkeys(r["label"] for r in sorted(group, key=lambda r: r["strategy"] != "dynamic")))
        by = {(r["cell"], r["label"]): r for r in group}
        hw = group[0]
        out.append(f"**{model}** ({dtype}, {hw['device']}: {hw['hardware_gpu'] if hw['hardware_gpu'] != 'None' else hw['hardware_cpu']}); "
                   f"KV bytes and ratio measured on `{main}`, tokens/s on `{speed}`\n")
        head = ["cache", "strategy", "KV bytes", "vs dynamic", "ppl", "Δppl", "prefill tok/s", "decode tok/s"] + tasks
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label in labels:
            r, fast = by.get((main, label), {}), by.get((speed, label), {})
            ppl = next((by[c, label] for c in cells if c.startswith("ppl-") and (c, label) in by), {})
            delta = ppl.get("perplexity_delta_vs_dynamic")
            line = [label, f"{r.get('strategy', '?')} {r.get('params', '')}", _fmt(r.get("kv_bytes"), ",.0f"),
                    _fmt(r.get("kv_ratio_vs_dynamic"), ".3f"), _fmt(ppl.get("perplexity"), ".3f"),
                    "–" if delta is None else f"{delta:+.3f}", _fmt(fast.get("prefill_tokens_per_s"), ".0f"),
                    _fmt(fast.get("decode_tokens_per_s"), ".1f")]
            line += [_fmt(by.get((c, label), {}).get("score"), ".2f") for c in tasks]
            out.append("| " + " | ".join(line) + " |")
        out.append("")
    return "\n".join(out)


def detail_table(rows: list[dict]) -> str:
    """Markdown: every run."""
    head = ["model", "cell", "cache", "score", "ppl", "KV bytes", "vs dynamic", "decode tok/s", "peak mem (kind)", "n", "run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["model"], r["cell"], r["label"], _fmt(r["score"], ".2f"), _fmt(r["perplexity"], ".3f"),
            _fmt(r["kv_bytes"], ",.0f"), _fmt(r["kv_ratio_vs_dynamic"], ".3f"), _fmt(r["decode_tokens_per_s"], ".1f"),
            f"{_fmt(r['peak_memory_bytes'], ',.0f')} ({r['peak_memory_kind']})", str(r["n"]), r["run_dir"],
        ]) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], folder: Path) -> list[Path]:
    """Per (model, cell): score or perplexity vs KV ratio, one curve per strategy, the dynamic baseline starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for model, cell in dict.fromkeys((r["model"], r["cell"]) for r in rows):
        group = [r for r in rows if (r["model"], r["cell"]) == (model, cell) and r["kv_ratio_vs_dynamic"] is not None]
        metric = "perplexity" if cell.startswith("ppl-") else "score"
        fig, ax = plt.subplots(figsize=(6, 4))
        for strategy in dict.fromkeys(r["strategy"] for r in group):
            points = sorted((r["kv_ratio_vs_dynamic"], r[metric], r["label"]) for r in group
                            if r["strategy"] == strategy and r[metric] is not None)
            if not points:
                continue
            x, y, labels = zip(*points)
            if strategy == "dynamic":
                ax.scatter(x, y, marker="*", s=200, color="black", zorder=3, label="dynamic (baseline)")
                ax.axhline(y[0], color="black", lw=0.8, ls="--", alpha=0.5)
            else:
                ax.plot(x, y, marker="o", label=strategy)
                for xi, yi, label in points:
                    ax.annotate(label, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set(xlabel="KV bytes / DynamicCache bytes (measured)", ylabel=metric, title=f"{model} — {cell}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = folder / f"{model.replace('/', '--')}_{cell}_{metric}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def dataset_card(rows: list[dict], recipe_dir: Path) -> str:
    """README.md for the results dataset: config, versions, hardware, the summary table."""
    first = rows[0]
    recipe = (recipe_dir / "recipe.yaml").read_text() if (recipe_dir / "recipe.yaml").exists() else "(not recorded)"
    versions = {k[len("version_"):]: v for k, v in first.items() if k.startswith("version_")}
    hardware = {k[len("hardware_"):]: v for k, v in first.items() if k.startswith("hardware_")}
    return (
        f"---\npretty_name: kvpress_lite results — {first['recipe']}\ntags:\n- kv-cache\n- long-context\n- kvpress_lite\n"
        f"license: apache-2.0\n---\n\n# kvpress_lite eval results: `{first['recipe']}`\n\n"
        "One row per run (cell x cache). KV bytes are measured resident bytes (`kvpress_lite.cache_nbytes`) at the end "
        "of each sample; ratios divide by DynamicCache's measured bytes for the same model, dtype and tokens. "
        "Perplexity is measured through the cache (prefix prefilled, the rest fed in chunks). CPU timings are indicative only.\n\n"
        f"## Summary\n\n{summary_table(rows)}\n## Versions\n\n```yaml\n{yaml.safe_dump(versions)}```\n\n"
        f"## Hardware\n\n```yaml\n{yaml.safe_dump(hardware)}```\n\n## Recipe (resolved)\n\n```yaml\n{recipe}```\n"
    )


def write_report(root: str | Path, push_to_hub: str | None = None, run_dirs=None) -> list[Path]:
    """Write `report/` (report.md, plots, dataset) in every recipe folder found below `root`; returns report.md paths."""
    import importlib.util

    rows, written = collect(root, run_dirs), []
    for recipe_dir in dict.fromkeys(r["recipe_dir"] for r in rows):
        group = [r for r in rows if r["recipe_dir"] == recipe_dir]
        out = Path(recipe_dir) / "report"
        pngs = plot(group, out / "plots")
        text = (f"# {group[0]['recipe']}\n\n## Summary\n\n{summary_table(group)}\n## All runs\n\n{detail_table(group)}\n\n"
                + "".join(f"![{p.stem}](plots/{p.name})\n" for p in pngs))
        (out / "report.md").write_text(text)
        written.append(out / "report.md")
        if importlib.util.find_spec("datasets") is None:  # a declared dependency, but bare images may lack it
            print("[eval.report] `datasets` is not installed: skipped the results dataset")
            continue
        from datasets import Dataset

        dataset = Dataset.from_list([{k: v for k, v in r.items() if k != "recipe_dir"} for r in group])
        dataset.save_to_disk(str(out / "dataset"))
        card = dataset_card(group, Path(recipe_dir))
        (out / "dataset" / "README.md").write_text(card)
        if push_to_hub:
            from huggingface_hub import DatasetCard

            dataset.push_to_hub(push_to_hub)
            DatasetCard(card).push_to_hub(push_to_hub, repo_type="dataset")
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir", help="output folder of `python -m eval` (or one recipe inside it)")
    parser.add_argument("--push-to-hub", metavar="REPO", help="also push each results dataset to this hub repo")
    args = parser.parse_args(argv)
    written = write_report(args.runs_dir, args.push_to_hub)
    if not written:
        raise SystemExit(f"[eval.report] no finished runs (metrics.json) under {args.runs_dir}")
    for path in written:
        print(f"[eval.report] wrote {path}")


if __name__ == "__main__":
    main()
