"""Reports regenerate from run folders: markdown tables, PNG plots, a datasets Dataset with its card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval import report
from eval.config import load_recipe
from eval.runner import run_recipe

SMOKE = Path(__file__).resolve().parent.parent / "recipes" / "smoke.yaml"


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    run_recipe(load_recipe(SMOKE), out)
    return out


def test_report_cli_writes_tables_plots_and_dataset(runs_dir, capsys):
    report.main([str(runs_dir)])
    folder = runs_dir / "smoke" / "report"
    assert f"wrote {folder / 'report.md'}" in capsys.readouterr().out
    text = (folder / "report.md").read_text()
    assert "| cache | strategy | KV bytes | vs dynamic | ppl | ppl change |" in text and "passkey-320" in text
    assert "peak mem" not in text and "max KV bytes" in text  # CPU runs: the cache's own peak, no RSS figure
    assert "| int4 |" in text and "| dynamic |" in text
    pngs = sorted((folder / "plots").glob("*.png"))
    assert [p.name for p in pngs] == ["tiny-llama_passkey-320_score.png", "tiny-llama_ppl-192+64_perplexity.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000 for p in pngs)

    from datasets import load_from_disk

    data = load_from_disk(str(folder / "dataset"))
    assert data.num_rows == 6
    assert {"label", "strategy", "score", "perplexity", "kv_ratio_vs_dynamic"} <= set(data.column_names)
    metrics = {json.loads((runs_dir / r["run_dir"] / "metrics.json").read_text())["config_hash"]: r for r in data}
    assert all(r["config_hash"] == h for h, r in metrics.items())
    card = (folder / "dataset" / "README.md").read_text()
    assert card.startswith("---\npretty_name:") and "## Versions" in card and "transformers:" in card
    assert "## Hardware" in card and "model: tiny-llama" in card  # the resolved recipe


def test_summary_numbers_come_from_metrics(runs_dir):
    rows = report.collect(runs_dir)
    int4 = next(r for r in rows if r["cell"] == "ppl-192+64" and r["label"] == "int4")
    line = next(line for line in report.summary_table(rows).splitlines() if line.startswith("| int4 |"))
    assert f"{int4['kv_ratio_vs_dynamic']:.3f}" in line and f"{int4['perplexity']:.3f}" in line
    assert f"{100 * int4['perplexity_change_vs_dynamic']:+.2f}%" in line


def test_collect_keeps_the_newest_run_of_a_cell(runs_dir):
    run_recipe(load_recipe(SMOKE, ["tasks.passkey.samples=2"]), runs_dir)  # same cells and labels, new hashes
    rows = [r for r in report.collect(runs_dir) if r["cell"] == "passkey-320"]
    assert len(rows) == 3 and {r["n"] for r in rows} == {2}


def test_plot_families_get_their_own_line():
    """h2o and h2o average=True are two families (two colours); bits set the line style; ratio/budget is the x axis."""
    assert report.family("h2o", {"ratio": 0.5}) == ("h2o", "", None)
    assert report.family("h2o", '{"average": true, "ratio": 0.2}') == ("h2o", "average=True", None)
    assert report.family("h2o", {"ratio": 0.5, "bits": 4}) == ("h2o", "", 4)
    assert report.family("quantized", {"bits": 8}) != report.family("quantized", {"bits": 4})


def test_plot_legend_names_every_family_and_the_baseline(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def row(strategy, params, ratio, score):
        return {"model": "m", "cell": "niah-2048", "task": "niah_multikey", "dtype": "float32", "strategy": strategy,
                "params": json.dumps(params), "label": strategy, "kv_ratio_vs_dynamic": ratio, "score": score, "n": 20,
                "perplexity": None}

    rows = [row("dynamic", {}, 1.0, 1.0), row("h2o", {"ratio": 0.5}, 0.5, 0.6), row("h2o", {"ratio": 0.2}, 0.2, 0.0),
            row("h2o", {"ratio": 0.5, "average": True}, 0.5, 0.4),
            row("h2o", {"ratio": 0.2, "average": True}, 0.2, 0.2),
            row("knorm", {"ratio": 0.5}, 0.5, 0.0), row("random", {"ratio": 0.5}, 0.5, 0.0)]
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    (path,) = report.plot(rows, tmp_path)
    (_,) = report.plot([r for r in rows if r["strategy"] in ("dynamic", "knorm")], tmp_path / "other")
    ax, other = figures[0].axes[0], figures[1].axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["h2o  (ratio 0.2, 0.5)", "h2o average=True  (ratio 0.2, 0.5)", "knorm  (ratio 0.5)",
                      "random  (ratio 0.5)", "DynamicCache (baseline): 1"]
    lines = {line.get_label().split("  ")[0]: line for line in ax.get_lines() if line.get_label() in legend}
    assert len({line.get_color() for line in lines.values()}) == 4  # one colour per family
    assert len({line.get_marker() for line in lines.values()}) == 4  # and one marker shape
    (knorm_alone,) = [line for line in other.get_lines() if line.get_label().startswith("knorm")]
    assert knorm_alone.get_color() == lines["knorm"].get_color()  # the same colour whatever else is plotted
    assert knorm_alone.get_marker() == lines["knorm"].get_marker()
    # equal scores (knorm and random at 0.0) keep their values and stay visible: hollow, different sizes
    assert lines["knorm"].get_ydata()[0] == lines["random"].get_ydata()[0] == 0.0
    assert all(line.get_markerfacecolor() == "none" for line in lines.values())
    assert lines["knorm"].get_markersize() > lines["random"].get_markersize()
    assert ax.get_xscale() == "log" and ax.get_ylim() == (-0.05, 1.05)  # scores: the same 0-1 range in every plot
    assert "n=20" in ax.get_ylabel() and "exact match" in ax.get_ylabel()
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_perplexity_plot_fits_the_data_and_draws_the_envelope(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def row(strategy, params, ratio, ppl):
        return {"model": "m", "cell": "ppl-512+512", "task": None, "dtype": "bfloat16", "strategy": strategy,
                "params": json.dumps(params), "label": strategy, "kv_ratio_vs_dynamic": ratio, "score": None, "n": 1,
                "perplexity": ppl, "eval_tokens": 512}

    rows = [row("dynamic", {}, 1.0, 9.3), row("tova", {"ratio": 0.5}, 0.26, 9.7),
            row("tova", {"ratio": 0.25}, 0.13, 11.1), row("h2o", {"ratio": 0.5}, 0.27, 13.1),
            row("h2o", {"ratio": 0.25}, 0.13, 15.7)]
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    report.plot(rows, tmp_path)
    ax = figures[0].axes[0]
    low, high = ax.get_ylim()
    assert 8.5 < low < 9.3 and 15.7 < high < 16.5  # fits the values, no empty band
    left, right = ax.get_xlim()
    assert 0.09 < left < 0.13 and 1.0 < right < 1.3 and ax.get_xscale() == "log"
    (envelope,) = [line for line in ax.get_lines() if line.get_label().startswith("best at each size")]
    assert list(envelope.get_ydata()) == [11.1, 9.7, 9.3]  # the best perplexity reachable at each size
