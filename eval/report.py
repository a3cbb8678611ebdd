"""Reports from run folders: markdown tables, PNG plots, a `datasets` Dataset with a card (optionally pushed).

Conventions (every table and plot): "vs dynamic" = measured KV bytes / DynamicCache's measured bytes for the same
tokens (< 1 is smaller); "ppl change" = perplexity / DynamicCache's perplexity - 1, in percent.

    python -m eval.report runs/                      # every recipe under runs/
    python -m eval.report runs/quickstart --push-to-hub user/kvpress-lite-quickstart
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

CONVENTIONS = ("\"vs dynamic\" = measured KV bytes / DynamicCache's measured bytes for the same tokens (< 1 is "
               "smaller); \"ppl change\" = perplexity / DynamicCache's perplexity - 1.")
FIELDS = ("score", "perplexity", "perplexity_delta_vs_dynamic", "perplexity_change_vs_dynamic", "kv_bytes",
          "kv_bytes_mean", "kv_bytes_max", "kv_ratio_vs_dynamic",
          "prefill_tokens_per_s", "decode_tokens_per_s", "wall_time_s", "cache_tokens", "eval_tokens", "n", "seed",
          "config_hash")


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
            **_peak(metrics["peak_memory"]),
            **{f"version_{k}": str(v) for k, v in metrics["versions"].items()},
            **{f"hardware_{k}": str(v) for k, v in metrics["hardware"].items()},
        }
        row.update({k: metrics.get(k) for k in FIELDS})
        delta = row["perplexity_delta_vs_dynamic"]
        if row["perplexity_change_vs_dynamic"] is None and delta is not None:  # runs from before the field
            row["perplexity_change_vs_dynamic"] = delta / (row["perplexity"] - delta)
        rows.append(row)
    if run_dirs is not None:
        return rows
    newest = {}  # rows come in execution (mtime) order; a later run of the same cell and label replaces in place
    for r in rows:
        newest[(r["recipe_dir"], r["model"], r["dtype"], r["cell"], r["label"])] = r
    return list(newest.values())


def _peak(peak: dict) -> dict:
    """Peak device memory of a run; CPU runs record none (older runs' process RSS growth is dropped: not a peak)."""
    kind = peak.get("kind")
    if kind is None or kind.startswith("cpu_rss"):
        return {"peak_memory_bytes": None, "peak_memory_kind": None}
    return {"peak_memory_bytes": peak["bytes"], "peak_memory_kind": kind}


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:+.2f}%"


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
        machine = hw["hardware_gpu"] if hw["hardware_gpu"] != "None" else hw["hardware_cpu"]
        out.append(f"**{model}** ({dtype}, {hw['device']}: {machine}); "
                   f"KV bytes and ratio measured on `{main}`, tokens/s on `{speed}`\n")
        head = ["cache", "strategy", "KV bytes", "vs dynamic", "ppl", "ppl change", "prefill tok/s", "decode tok/s"]
        head += tasks
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label in labels:
            r, fast = by.get((main, label), {}), by.get((speed, label), {})
            ppl = next((by[c, label] for c in cells if c.startswith("ppl-") and (c, label) in by), {})
            line = [label, f"{r.get('strategy', '?')} {r.get('params', '')}", _fmt(r.get("kv_bytes"), ",.0f"),
                    _fmt(r.get("kv_ratio_vs_dynamic"), ".3f"), _fmt(ppl.get("perplexity"), ".3f"),
                    _pct(ppl.get("perplexity_change_vs_dynamic")), _fmt(fast.get("prefill_tokens_per_s"), ".0f"),
                    _fmt(fast.get("decode_tokens_per_s"), ".1f")]
            line += [_fmt(by.get((c, label), {}).get("score"), ".2f") for c in tasks]
            out.append("| " + " | ".join(line) + " |")
        out.append("")
    return "\n".join(out)


def detail_table(rows: list[dict]) -> str:
    """Markdown: every run. "max KV bytes": the cache's largest resident bytes after any forward; "peak mem": CUDA
    `max_memory_allocated` (GPU runs only: on CPU no process-wide figure isolates the cache)."""
    gpu = any(r["peak_memory_bytes"] is not None for r in rows)
    head = ["model", "cell", "cache", "score", "ppl", "KV bytes", "max KV bytes", "vs dynamic", "decode tok/s"]
    head += ["peak mem (CUDA)"] if gpu else []
    head += ["n", "run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        line = [r["model"], r["cell"], r["label"], _fmt(r["score"], ".2f"), _fmt(r["perplexity"], ".3f"),
                _fmt(r["kv_bytes"], ",.0f"), _fmt(r["kv_bytes_max"], ",.0f"), _fmt(r["kv_ratio_vs_dynamic"], ".3f"),
                _fmt(r["decode_tokens_per_s"], ".1f")]
        line += [_fmt(r["peak_memory_bytes"], ",.0f")] if gpu else []
        line += [str(r["n"]), r["run_dir"]]
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


SWEPT = ("ratio", "budget")  # the x axis of a family's line: how much is kept
_BITS_STYLE = {None: ("-", "o"), 8: ("--", "s"), 4: (":", "^"), 2: ("-.", "v")}
_MARKERS = "oDPXsph*<>"


def family(strategy: str, params: str | dict) -> tuple[str, str, int | None]:
    """`(strategy, variant, bits)` of a run: its line in a plot. The variant is every param except the swept
    amount (`ratio`/`budget`) and `bits`, e.g. `average=True`; bits get their own line style."""
    params = json.loads(params) if isinstance(params, str) else dict(params)
    bits = params.pop("bits", None)
    variant = " ".join(f"{k}={v}" for k, v in sorted(params.items()) if k not in SWEPT)
    return strategy, variant, bits


def _is_baseline(row: dict) -> bool:
    return row["strategy"] == "dynamic" and not json.loads(row["params"])


def _family_label(strategy: str, variant: str, bits) -> str:
    return " ".join(filter(None, [strategy, variant, f"int{bits}" if bits else ""]))


def _axis_label(cell_rows: list[dict], metric: str) -> str:
    n = sorted({r["n"] for r in cell_rows})
    n_text = f"{n[0]}" if len(n) == 1 else f"{n[0]}-{n[-1]}"
    if metric == "perplexity":
        tokens = sorted({r.get("eval_tokens") or 0 for r in cell_rows})
        scored = f"{tokens[-1]} tokens" if tokens[-1] else f"{n_text} window(s)"
        return f"perplexity through the cache ({scored}; lower is better)"
    task = cell_rows[0]["task"] or cell_rows[0]["cell"]
    return f"exact match, {task} (n={n_text} samples per point)"


def plot(rows: list[dict], folder: Path) -> list[Path]:
    """Per (model, cell): score or perplexity vs KV ratio. One colour and line per family (strategy + variant),
    a line style and marker per `bits`, the DynamicCache baseline as a black star and a dashed line, a legend
    beside the axes naming the swept ratios/budgets (no labels over the points). Equal values stay visible: later
    families are drawn smaller on top, and exact ties are nudged apart vertically (1.2% of the range per family,
    noted on the plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for model, cell in dict.fromkeys((r["model"], r["cell"]) for r in rows):
        group = [r for r in rows if (r["model"], r["cell"]) == (model, cell) and r["kv_ratio_vs_dynamic"] is not None]
        metric = "perplexity" if cell.startswith("ppl-") else "score"
        group = [r for r in group if r[metric] is not None]
        if not group:
            continue
        others = [r for r in group if not _is_baseline(r)]
        families = sorted({family(r["strategy"], r["params"]) for r in others},
                          key=lambda f: (f[0], f[1], -(f[2] or 99)))  # strategy, its variants, then bits high to low
        hues = list(dict.fromkeys((f[0], f[1]) for f in families))
        colors = plt.get_cmap("tab10" if len(hues) <= 10 else "tab20").colors
        values = [r[metric] for r in group]
        span = (max(values) - min(values)) or 1.0
        fig, ax = plt.subplots(figsize=(8, 4.2))
        # exact ties (knorm and random both at 0.0): the families sharing a point are nudged apart vertically
        ties: dict = {}
        for fam in families:
            for r in others:
                if family(r["strategy"], r["params"]) == fam:
                    ties.setdefault((round(r["kv_ratio_vs_dynamic"], 6), round(r[metric], 9)), []).append(fam)
        nudged = False
        for i, fam in enumerate(families):
            hue = hues.index(fam[:2])
            style, marker = _BITS_STYLE.get(fam[2], ("-", "o"))
            marker = marker if fam[2] is not None else _MARKERS[hue % len(_MARKERS)]
            members = [r for r in others if family(r["strategy"], r["params"]) == fam]
            points = []
            for r in members:
                x, y = r["kv_ratio_vs_dynamic"], r[metric]
                tied = ties[(round(x, 6), round(y, 9))]
                if len(tied) > 1:
                    y += (tied.index(fam) - (len(tied) - 1) / 2) * 0.012 * span
                    nudged = True
                points.append((x, y))
            points.sort()
            swept = [f"{k} " + ", ".join(f"{v:g}" for v in sorted({json.loads(r["params"])[k] for r in members
                                                                 if k in json.loads(r["params"])}))
                     for k in SWEPT if any(k in json.loads(r["params"]) for r in members)]
            size = max(11 - i * 6 / max(len(families) - 1, 1), 5)  # later families smaller, drawn on top
            x, y = zip(*points)
            ax.plot(x, y, ls=style, marker=marker, color=colors[hue % len(colors)], lw=1.6,
                    ms=size, label=_family_label(*fam) + (f"  ({'; '.join(swept)})" if swept else ""), alpha=0.9,
                    zorder=2 + i / 100)
        base = [r for r in group if _is_baseline(r)]
        if base:
            ax.axhline(base[0][metric], color="black", lw=0.9, ls="--", alpha=0.6)
            ax.scatter([base[0]["kv_ratio_vs_dynamic"]], [base[0][metric]], marker="*", s=220, color="black", zorder=4,
                       label=f"DynamicCache (baseline): {base[0][metric]:.3g}")
        ax.set_xlabel("KV bytes / DynamicCache bytes (measured; lower = smaller cache)")
        ax.set_ylabel(_axis_label(group, metric), fontsize=9)
        hw = group[0]
        ax.set_title(f"{model} ({hw['dtype']}) — {cell}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, frameon=False)
        if nudged:
            ax.annotate(f"equal values nudged apart by {0.012 * span:.2g} per family", (1.01, 0.0),
                        xycoords="axes fraction", fontsize=7, color="0.4")
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
        f"---\npretty_name: kvpress_lite results — {first['recipe']}\n"
        "tags:\n- kv-cache\n- long-context\n- kvpress_lite\n"
        f"license: apache-2.0\n---\n\n# kvpress_lite eval results: `{first['recipe']}`\n\n"
        "One row per run (cell x cache). KV bytes are measured resident bytes (`kvpress_lite.cache_nbytes`) at the end "
        "of each sample; ratios divide by DynamicCache's measured bytes for the same model, dtype and tokens (< 1 is "
        "smaller); perplexity changes are relative (ours / DynamicCache's - 1). "
        "Perplexity is measured through the cache (prefix prefilled, the rest fed in chunks). "
        "CPU timings are indicative only.\n\n"
        f"## Summary\n\n{summary_table(rows)}\n## Versions\n\n```yaml\n{yaml.safe_dump(versions)}```\n\n"
        f"## Hardware\n\n```yaml\n{yaml.safe_dump(hardware)}```\n\n## Recipe (resolved)\n\n```yaml\n{recipe}```\n"
    )


def write_report(root: str | Path, push_to_hub: str | None = None, run_dirs=None) -> list[Path]:
    """Write `report/` (report.md, plots, dataset) in every recipe folder below `root`; returns report.md paths."""
    import importlib.util

    rows, written = collect(root, run_dirs), []
    for recipe_dir in dict.fromkeys(r["recipe_dir"] for r in rows):
        group = [r for r in rows if r["recipe_dir"] == recipe_dir]
        out = Path(recipe_dir) / "report"
        pngs = plot(group, out / "plots")
        text = (f"# {group[0]['recipe']}\n\n{CONVENTIONS}\n\n## Summary\n\n{summary_table(group)}\n"
                f"## All runs\n\n{detail_table(group)}\n\n" + "".join(f"![{p.stem}](plots/{p.name})\n" for p in pngs))
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
