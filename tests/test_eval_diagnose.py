"""`python -m eval.diagnose`: attention-ranking policies score a harness prompt as eager attention weights say."""

from __future__ import annotations

from pathlib import Path

import pytest

from eval.diagnose import diagnose

SMOKE = str(Path(__file__).resolve().parent.parent / "recipes" / "smoke.yaml")


@pytest.mark.parametrize("override", [[], ["caches.h2o.params.average=true"], ["caches.h2o.strategy=tova"],
                                      ["caches.h2o.strategy=snapkv"]], ids=["h2o", "h2o-mean", "tova", "snapkv"])
def test_policy_scores_match_the_eager_reference_and_keep_report_is_consistent(override, capsys):
    rows = diagnose(SMOKE, "passkey-320", "h2o", [1], override)
    assert len(rows) == 2  # tiny Llama: two full-attention layers
    for row in rows:
        assert row["rel_err_eager"] < 1e-5 and row["rel_err_sdpa"] < 1e-5
        start, end = row["needle_tokens"]
        assert 0 < start < end < row["prompt_tokens"] and row["budget"] == -(-row["prompt_tokens"] // 2)
        assert all(0.0 <= s <= 1.0 for s in row["needle_kept_share_per_kv_head"])
    assert "scores vs eager reference" in capsys.readouterr().out
