"""Recipe parsing: defaults -> YAML (with include) -> CLI overrides; errors name the offending key."""

from __future__ import annotations

from pathlib import Path

import pytest

from eval.config import load_recipe, recipe_from_dict

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
BASE = {"model": "tiny-llama", "tasks": {"passkey": {"lengths": [256]}}}


def _recipe(**changes):
    data = {**BASE, **changes}
    return recipe_from_dict({k: v for k, v in data.items() if v is not None}, "t")


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_parse_with_the_baseline_first(path):
    recipe = load_recipe(path)
    # a recipe is named by its file, or names another shipped recipe whose results folder it adds cells to
    # (leaderboard_bits.yaml and leaderboard_adaptive.yaml add to results/leaderboard/)
    assert recipe.name == path.stem or (RECIPES / f"{recipe.name}.yaml").exists()
    assert recipe.caches[0].strategy == "dynamic" and recipe.caches[0].params == {}
    parts = [recipe.perplexity] + list(recipe.tasks.values())
    for part in parts:
        if part is not None and part.caches is not None:
            assert part.caches[0].is_baseline


def test_quickstart_sweep_and_defaults():
    recipe = load_recipe(RECIPES / "quickstart.yaml")
    assert [c.label for c in recipe.caches] == ["dynamic", "int8", "int4", "hf-quanto-int4", "h2o-0.5", "tova-0.5-int4",
                                                "crosslayer-plan"]
    assert recipe.perplexity.chunk_size == 16 and recipe.perplexity.source == "pydoc"
    assert recipe.tasks["passkey"].params.digits == 5  # task default kept


def test_overrides_reach_every_level():
    recipe = load_recipe(RECIPES / "quickstart.yaml", [
        "model=gemma3-270m", "tasks.passkey.samples=5", "tasks.passkey.lengths=[512, 1024]",
        "caches.int4.params.bits=2", "caches.int8=null", "perplexity.chunk_size=1", "tasks.passkey.digits=7",
    ])
    assert recipe.model == "gemma3-270m" and recipe.tasks["passkey"].samples == 5
    assert recipe.tasks["passkey"].lengths == [512, 1024] and recipe.tasks["passkey"].params.digits == 7
    assert {c.label: c.params for c in recipe.caches}["int4"] == {"bits": 2}
    assert "int8" not in [c.label for c in recipe.caches]
    assert recipe.perplexity.chunk_size == 1
    assert load_recipe(RECIPES / "quickstart.yaml", ["perplexity=null"]).perplexity is None


def test_include_merges_and_null_removes(tmp_path):
    (tmp_path / "base.yaml").write_text("model: tiny-llama\nseed: 3\nperplexity: {eval_length: 64}\n"
                                        "tasks: {passkey: {lengths: [256]}}\n")
    (tmp_path / "variant.yaml").write_text("include: base.yaml\nseed: 4\nperplexity: null\n"
                                           "tasks: {passkey: {samples: 2}}\n")
    recipe = load_recipe(tmp_path / "variant.yaml")
    assert (recipe.name, recipe.seed, recipe.model, recipe.perplexity) == ("variant", 4, "tiny-llama", None)
    assert recipe.tasks["passkey"].lengths == [256] and recipe.tasks["passkey"].samples == 2


def test_dynamic_added_sweep_expanded_and_task_alias():
    recipe = _recipe(caches=[{"strategy": "quantized", "sweep": {"bits": [8, 4]}},
                             {"sweep": {"strategy": ["h2o", "tova"], "ratio": [0.5]}}],
                     tasks={"mk": {"task": "niah_multikey", "lengths": [900]}})
    assert [c.label for c in recipe.caches] == ["dynamic", "quantized-bits8", "quantized-bits4",
                                                "h2o-ratio0.5", "tova-ratio0.5"]
    assert recipe.tasks["mk"].params.num_keys == 4


@pytest.mark.parametrize("change, key", [
    ({"modle": "x"}, "modle"),
    ({"tasks": {"passkey": {"lengths": [256], "sample": 3}}}, "tasks.passkey.sample"),
    ({"tasks": {"passkey": {"lengths": [256], "samples": 0}}}, "tasks.passkey.samples"),
    ({"tasks": {"passkey": {"lengths": ["long"]}}}, "tasks.passkey.lengths[0]"),
    ({"tasks": {"passkey": {"lengths": [256], "depths": [0.5, 1.5]}}}, "tasks.passkey.depths[1]"),
    ({"tasks": {"passkey": {"lengths": [256], "digits": 0}}}, "tasks.passkey"),
    ({"tasks": {"passky": {"lengths": [256]}}}, "tasks.passky.task"),
    ({"tasks": {"pass/key": {"task": "passkey"}}}, "tasks.pass/key"),
    ({"caches": [{"strategy": "h2o2"}]}, "caches[0].strategy"),
    ({"caches": [{"sweep": {"strategy": ["h2o", "nope"]}}]}, "caches[0].sweep.strategy"),
    ({"caches": [{"strategy": "quantized", "params": {"bitz": 4}}]}, "caches[0].params"),
    ({"caches": [{"strategy": "quantized", "label": "a"}, {"strategy": "h2o", "label": "a"}]}, "label 'a'"),
    ({"caches": [{"strategy": "quantized", "label": "a/b"}]}, "caches[0].label"),
    ({"dtype": "int3"}, "dtype"),
    ({"device": "tpu"}, "device"),
    ({"seed": "zero"}, "seed"),
    ({"chat": "yes"}, "chat"),
    ({"perplexity": {"chunk_size": 0}}, "perplexity.chunk_size"),
    ({"perplexity": {"prefix_lenght": 8}}, "perplexity.prefix_lenght"),
    ({"tasks": {"passkey": {"lengths": [256], "caches": [{"strategy": "x"}]}}}, "tasks.passkey.caches[0].strategy"),
])
def test_bad_values_name_the_key(change, key):
    with pytest.raises(ValueError) as err:
        _recipe(**change)
    assert key in str(err.value)


def test_bad_override_syntax_and_missing_item():
    with pytest.raises(ValueError, match="key.path=value"):
        load_recipe(RECIPES / "smoke.yaml", ["samples"])
    with pytest.raises(ValueError, match="no list item 'int9'"):
        load_recipe(RECIPES / "smoke.yaml", ["caches.int9.params.bits=2"])
    with pytest.raises(ValueError, match="not found"):
        load_recipe(RECIPES / "nope.yaml")
