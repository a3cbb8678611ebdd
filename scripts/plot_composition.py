"""Plot perplexity against measured compression for the composition recipe (eviction x bits), log x axis.

python scripts/plot_composition.py [results/composition] [docs/results/composition_ppl_smollm2.png]

One colour per policy, one line style per storage (bf16 / int8 / int4), points along a line = eviction ratios; the
quantization-only caches and DynamicCache for reference; the lower-left envelope (Pareto frontier) in grey.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

POLICY_COLOURS = {"snapkv": "tab:green", "tova": "tab:brown", "h2o-avg": "tab:blue", "quantized": "tab:orange"}
BITS_STYLE = {None: ("-", "o", "bf16"), 8: ("--", "s", "int8"), 4: (":", "^", "int4")}


def load(folder: Path) -> list[dict]:
    rows = []
    for metrics in sorted(folder.glob("smollm2-135m/ppl-*/*/metrics.json")):
        config = yaml.safe_load((metrics.parent / "config.yaml").read_text())
        cache = config.get("cache", config)
        label = cache.get("label", metrics.parent.name)
        m = json.loads(metrics.read_text())
        rows.append({"label": label, "params": cache.get("params", {}), "strategy": cache.get("strategy"),
                     "compression": 1 / m["kv_ratio_vs_dynamic"], "ppl": m["perplexity"]})
    return rows


def family(row: dict) -> str | None:
    label = row["label"]
    if label.startswith(("channelkeys", "tokenkeys")):
        return None  # layout alternatives: in docs/composition.md's table, not on the frontier plot
    return "h2o-avg" if label.startswith("h2o-avg") else row["strategy"]


def main(folder="results/composition", out="docs/results/composition_ppl_smollm2.png") -> None:
    rows = load(Path(folder))
    fig, ax = plt.subplots(figsize=(8, 5))
    for policy, colour in POLICY_COLOURS.items():
        for bits, (style, marker, name) in BITS_STYLE.items():
            pts = sorted((r["compression"], r["ppl"]) for r in rows
                         if family(r) == policy and r["params"].get("bits") == bits)
            if pts:
                ax.plot(*zip(*pts), style, marker=marker, color=colour, label=f"{policy} {name}")
    dynamic = next(r for r in rows if r["strategy"] == "dynamic")
    ax.plot([1], [dynamic["ppl"]], "k*", markersize=14, label=f"DynamicCache ({dynamic['ppl']:.2f})")
    pareto, best = [], float("inf")
    candidates = [r for r in rows if family(r) or r["strategy"] == "dynamic"]
    for r in sorted(candidates, key=lambda r: -r["compression"]):  # from the most compressed: keep each new minimum
        if r["ppl"] < best:
            pareto.append(r)
            best = r["ppl"]
    ax.plot([r["compression"] for r in pareto], [r["ppl"] for r in pareto], color="grey", alpha=0.35, linewidth=6,
            zorder=0, label="frontier")
    ax.axvspan(4, 20, color="grey", alpha=0.07, label="4x-20x")
    ax.set_xscale("log")
    ax.set_xticks([1, 2, 4, 8, 16, 32, 64])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("compression: DynamicCache bytes / cache bytes (measured at 2048 tokens; log scale)")
    ax.set_ylabel("perplexity through the cache (1536 tokens)")
    ax.set_title("SmolLM2-135M bf16: eviction x quantization (ratios 1.0 / 0.5 / 0.25 along each line)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
