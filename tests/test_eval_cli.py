"""`python -m eval`: usage without arguments, one-line errors (traceback only with --debug), YAML line numbers,
--dry-run that builds every cache on a weightless model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from eval.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "recipes" / "smoke.yaml")


def _error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_no_arguments_prints_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m eval") and "--dry-run" in out and "--debug" in out


def test_bad_value_is_one_line_naming_file_key_and_accepted_values(capsys):
    line = _error(capsys, SMOKE, "tasks.passkey.samples=0")
    assert SMOKE in line and "tasks.passkey.samples=0 must be >= 1" in line and "--debug" in line
    line = _error(capsys, SMOKE, "dtype=int3")
    assert "dtype='int3'" in line and "'bfloat16'" in line


def test_broken_yaml_names_file_and_line(tmp_path, capsys):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("model: tiny-llama\nseed: 0\ntasks: {passkey: {lengths: [256]\n")
    line = _error(capsys, str(recipe))
    assert str(recipe) in line and "line 4" in line and "invalid YAML" in line
    assert "<unicode string>" not in line


def test_dry_run_builds_caches_on_the_config_and_fails_on_bad_params(capsys):
    line = _error(capsys, SMOKE, "caches.int4.params.bits=3", "--dry-run")
    assert "'int4'" in line and "bits=3" in line and "[2, 4, 8]" in line
    main([SMOKE, "--dry-run"])
    out = capsys.readouterr().out
    assert "3 caches build on its config" in out and out.count("runs/smoke/tiny-llama/") == 6


def test_dry_run_reads_no_weights(monkeypatch, capsys):
    from eval import zoo

    def no_weights(*args, **kwargs):
        raise AssertionError("--dry-run loaded a model")

    monkeypatch.setattr(zoo, "load", no_weights)
    main([SMOKE, "--dry-run"])
    assert "caches build on its config" in capsys.readouterr().out


def test_debug_shows_the_traceback():
    with pytest.raises(ValueError, match="samples=0"):
        main([SMOKE, "tasks.passkey.samples=0", "--debug"])


def test_module_entry_point_from_the_checkout():
    proc = subprocess.run([sys.executable, "-m", "eval", SMOKE, "caches.h2o.params.ratio=3", "--dry-run"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and "ratio=3" in proc.stderr


@pytest.mark.parametrize("dry_run", [True, False])
def test_cuda_without_a_gpu_fails_at_once(capsys, monkeypatch, dry_run):
    """`device=cuda` on a machine without CUDA: one line naming the key, before any model loads (dry run or not)."""
    import torch

    from eval import zoo

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(zoo, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    line = _error(capsys, SMOKE, "device=cuda", *(["--dry-run"] if dry_run else []))
    assert "device='cuda'" in line and "no CUDA GPU" in line and "'cpu'" in line
