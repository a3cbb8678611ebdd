"""Reports from run folders: markdown tables, PNG plots, a `datasets` Dataset with a card (optionally pushed).

Conventions (every table and plot): "vs dynamic" = measured KV bytes / DynamicCache's measured bytes for the same
tokens (< 1 is smaller); "ppl change" = perplexity / DynamicCache's perplexity - 1, in percent.

    python -m eval.report runs/                      # every recipe under runs/
    python -m eval.report runs/quickstart --push-to-hub user/kvpress-lite-quickstart
    python -m eval.report results/ --figures docs/results   # the README's and docs/results.md's figures
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
BITS_STYLE = {None: "-", 8: "--", 4: ":", 2: "-."}  # line style per storage: bf16/fp32, int8, int4, int2
# One colour and one marker shape per policy / cache, the same in every plot. A variant of a strategy (other params than
# the swept amount and bits) keeps the strategy's colour and takes a marker of its own unless listed here.
COLOURS = {
    "dynamic": "black", "quantized": "tab:orange", "quantized_static": "goldenrod", "hf-quantized": "tab:red",
    "h2o": "tab:blue", "h2o average=True": "tab:cyan", "tova": "tab:brown", "snapkv": "tab:green",
    "knorm": "tab:olive", "streaming": "tab:pink", "random": "tab:gray", "crosslayer": "tab:purple",
}
MARKERS = {
    "quantized": "s", "quantized_static": "d", "hf-quantized": "D", "h2o": "o", "h2o average=True": "h", "tova": "^",
    "snapkv": "P", "knorm": "X", "streaming": "v", "random": "<", "crosslayer": "p",
}
_SPARE_MARKERS = ">8H*osD^v<phdPX"  # variants without a marker of their own take these, in order of appearance
_FALLBACK_COLOURS = ("tab:olive", "darkslateblue", "teal", "maroon", "darkkhaki")


def family(strategy: str, params: str | dict) -> tuple[str, str, int | None]:
    """`(strategy, variant, bits)` of a run: its line in a plot. The variant is every param except the swept
    amount (`ratio`/`budget`) and `bits`, e.g. `average=True`; bits get their own line style."""
    params = json.loads(params) if isinstance(params, str) else dict(params)
    bits = params.pop("bits", None)
    variant = " ".join(f"{k}={v}" for k, v in sorted(params.items()) if k not in SWEPT)
    return strategy, variant, bits


def family_style(strategy: str, variant: str, spare: dict) -> tuple[str, str]:
    """`(colour, marker)` of a family: fixed per strategy (and listed variants) across plots; other variants keep the
    strategy's colour with a spare marker (`spare` maps the plot's variants to the markers they took)."""
    key = f"{strategy} {variant}".strip()
    colour = COLOURS.get(key) or COLOURS.get(strategy)
    if colour is None:
        colour = _FALLBACK_COLOURS[sum(map(ord, strategy)) % len(_FALLBACK_COLOURS)]
    marker = MARKERS.get(key) or (MARKERS.get(strategy, "o") if not variant else None)
    if marker is None:
        marker = spare.setdefault(key, _SPARE_MARKERS[len(spare) % len(_SPARE_MARKERS)])
    return colour, marker


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


def _frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Lower envelope of (bytes ratio, perplexity): the best perplexity reachable at or below each byte ratio."""
    out, best = [], float("inf")
    for x, y in sorted(points):
        if y < best:
            out.append((x, y))
            best = y
    return out


def plot(rows: list[dict], folder: Path) -> list[Path]:
    """Per (model, cell): score or perplexity vs KV ratio on a log axis (smaller caches to the left, in every plot).

    One colour and marker shape per policy/cache, fixed across plots (`COLOURS`, `MARKERS`); a line style per `bits`;
    hollow markers, larger for families drawn first, so points on the same spot stay visible (values are never moved);
    the DynamicCache baseline as a black star and a dashed line; a legend beside the axes naming the swept
    ratios/budgets. Scores span 0-1 in every plot; perplexity axes fit the data (log when it spans over 2.5x) and show
    the lower envelope (best perplexity at each byte budget) in grey.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullFormatter

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
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        spare: dict = {}
        for i, fam in enumerate(families):
            colour, marker = family_style(fam[0], fam[1], spare)
            members = [r for r in others if family(r["strategy"], r["params"]) == fam]
            x, y = zip(*sorted((r["kv_ratio_vs_dynamic"], r[metric]) for r in members))
            swept = [f"{k} " + ", ".join(f"{v:g}" for v in sorted({json.loads(r["params"])[k] for r in members
                                                                 if k in json.loads(r["params"])}))
                     for k in SWEPT if any(k in json.loads(r["params"]) for r in members)]
            size = max(13 - i * 7 / max(len(families) - 1, 1), 6)  # first drawn largest: smaller ones sit inside
            ax.plot(x, y, ls=BITS_STYLE.get(fam[2], "-"), marker=marker, color=colour, lw=1.4, ms=size,
                    mfc="none", mew=1.8, label=_family_label(*fam) + (f"  ({'; '.join(swept)})" if swept else ""),
                    zorder=3 + i / 100)
        base = [r for r in group if _is_baseline(r)]
        values = [r[metric] for r in group]
        if base:
            ax.axhline(base[0][metric], color="black", lw=0.9, ls="--", alpha=0.6)
            ax.scatter([base[0]["kv_ratio_vs_dynamic"]], [base[0][metric]], marker="*", s=220, color="black", zorder=4,
                       label=f"DynamicCache (baseline): {base[0][metric]:.3g}")
        if metric == "perplexity":
            env = _frontier([(r["kv_ratio_vs_dynamic"], r[metric]) for r in group])
            if len(env) > 1:
                ax.plot(*zip(*env), color="grey", alpha=0.3, lw=6, zorder=1, label="best at each size (envelope)")
            low, high = min(values), max(values)
            if high / low > 2.5:  # e.g. cross-layer caches at +500%: a linear axis would flatten everything else
                ax.set_yscale("log")
                ax.set_ylim(low / 1.08, high * 1.08)
                ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            else:
                pad = (high - low) * 0.06 or 0.05 * high
                ax.set_ylim(low - pad, high + pad)
        else:
            ax.set_ylim(-0.05, 1.05)
        ax.set_xscale("log")
        xs = [r["kv_ratio_vs_dynamic"] for r in group]
        ax.set_xlim(min(xs) / 1.25, max(xs) * 1.25)
        ticks = [t for t in (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 0.85, 1.0)
                 if min(xs) / 1.25 <= t <= max(xs) * 1.25]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("KV bytes / DynamicCache bytes (measured, log scale; smaller cache to the left)", fontsize=9)
        ax.set_ylabel(_axis_label(group, metric), fontsize=9)
        ax.set_title(f"{model} ({group[0]['dtype']}) — {cell}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, frameon=False)
        path = folder / f"{model.replace('/', '--')}_{cell}_{metric}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")  # the legend beside the axes included
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
    parser.add_argument("--figures", metavar="DIR", help="also copy every plot to DIR as <recipe>_<plot>.png")
    args = parser.parse_args(argv)
    written = write_report(args.runs_dir, args.push_to_hub)
    if not written:
        raise SystemExit(f"[eval.report] no finished runs (metrics.json) under {args.runs_dir}")
    for path in written:
        print(f"[eval.report] wrote {path}")
        if args.figures:
            import shutil

            Path(args.figures).mkdir(parents=True, exist_ok=True)
            for png in sorted((path.parent / "plots").glob("*.png")):
                shutil.copyfile(png, Path(args.figures) / f"{path.parent.parent.name}_{png.name}")


if __name__ == "__main__":
    main()
