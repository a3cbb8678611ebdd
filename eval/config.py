"""Recipe config: dataclass defaults -> YAML recipe -> CLI overrides, one path, errors name the offending key.

    recipe = load_recipe("recipes/quickstart.yaml", ["model=gemma3-270m", "tasks.passkey.samples=5"])
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvpress_lite.models import check_device

from .recipe_io import apply_overrides, read_recipe

DTYPES = ("bfloat16", "float16", "float32")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")


@dataclass
class PerplexityConfig:
    """Perplexity through the cache (eval/perplexity.py): prefill `prefix_length`, score `eval_length` tokens."""

    source: str = "pydoc"  # pydoc | local file | datasets:NAME:CONFIG:SPLIT
    prefix_length: int = 256
    eval_length: int = 512
    chunk_size: int = 1  # tokens per forward after the prefix (1 = token by token, the strictest)
    windows: int = 1  # consecutive text windows of prefix + eval tokens; sharded over processes
    model: str | None = None  # default: the recipe's model
    dtype: str | None = None
    caches: list | None = None  # this part's sweep (same schema as the recipe's); default: the recipe's

    def validate(self, key: str):
        for name in ("prefix_length", "eval_length", "chunk_size", "windows"):
            _positive(f"{key}.{name}", getattr(self, name))


@dataclass
class TaskSpec:
    """One long-context task (eval/tasks) at several lengths; samples cycle through `depths`."""

    task: str = ""  # registry name; default: the key under `tasks:`
    lengths: list[int] = field(default_factory=lambda: [1024])  # prompt tokens (model's tokenizer)
    depths: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])  # 0 = context start, 1 = end
    samples: int = 5
    batch_size: int = 1  # > 1 pads on the left
    max_new_tokens: int | None = None  # default: the task's own
    haystack: str | None = None  # noise | pydoc | local file | datasets:...; default: the task's own
    model: str | None = None
    dtype: str | None = None
    caches: list | None = None  # this task's sweep (same schema as the recipe's); default: the recipe's
    params: Any = None  # the task's Params dataclass (task-specific keys sit flat in the YAML)

    def validate(self, key: str):
        for name in ("samples", "batch_size"):
            _positive(f"{key}.{name}", getattr(self, name))
        if self.max_new_tokens is not None:
            _positive(f"{key}.max_new_tokens", self.max_new_tokens)
        if not self.lengths or not self.depths:
            raise ValueError(f"{key}: lengths and depths must be non-empty lists")
        for i, length in enumerate(self.lengths):
            _positive(f"{key}.lengths[{i}]", length)
        for i, depth in enumerate(self.depths):
            if not 0.0 <= depth <= 1.0:
                raise ValueError(f"{key}.depths[{i}]={depth!r} must be in [0, 1]")


@dataclass
class CacheSpec:
    """A cache of the sweep: a registered strategy (kvpress_lite.registry) with params and a unique label."""

    strategy: str = "dynamic"
    label: str = ""  # folder and table name; default: the strategy name
    params: dict = field(default_factory=dict)

    @property
    def is_baseline(self) -> bool:
        return self.strategy == "dynamic" and not self.params


@dataclass
class Recipe:
    """A whole evaluation: model, seed, perplexity, tasks and the sweep of caches."""

    name: str = ""  # default: the recipe file's stem
    model: str = "smollm2-135m"  # smollm2-135m | gemma3-270m | tiny-llama | tiny-gemma3 | local dir
    dtype: str = "bfloat16"
    device: str = "cpu"
    attn_implementation: str = "sdpa"
    num_threads: int | None = None  # torch CPU threads; None = torch's default (1 is far faster on a loaded CPU)
    seed: int = 0
    chat: bool = False  # render task prompts with the tokenizer's chat template
    output_dir: str = "runs"
    warmup: bool = True  # one untimed prefill + decode per run before measuring
    perplexity: PerplexityConfig | None = None
    tasks: dict = field(default_factory=dict)  # key -> TaskSpec
    caches: list = field(default_factory=lambda: [CacheSpec()])  # list of CacheSpec; `dynamic` is always added

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _positive(key: str, value) -> None:
    if value < 1:
        raise ValueError(f"{key}={value!r} must be >= 1")


def _coerce(key: str, value, annotation):
    """Check `value` against a field annotation (int, float, str, bool, list[...], dict, X | None)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(key, value, next(a for a in args if a is not type(None)))
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{key}={value!r} must be a list")
        return [_coerce(f"{key}[{i}]", item, args[0]) for i, item in enumerate(value)]
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}={value!r} must be a mapping")
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, bool) or not isinstance(value, annotation):
        raise ValueError(f"{key}={value!r} must be of type {annotation.__name__}")
    return value


def build(cls, data: dict, key: str, skip: tuple = ()):
    """Instantiate dataclass `cls` from a mapping; unknown keys and wrong types raise a ValueError naming the key."""
    if not isinstance(data, dict):
        raise ValueError(f"{key} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"unknown key(s) {[f'{key}.{u}' if key else u for u in unknown]}; accepted: {names}")
    values = {
        name: _coerce(f"{key}.{name}" if key else name, data[name], hints[name]) for name in names if name in data
    }
    try:
        return cls(**values)
    except ValueError as err:  # a dataclass __post_init__ check
        raise ValueError(f"{key}: {err}") from None


def _task(key: str, data: dict) -> TaskSpec:
    from .tasks import get_task

    if not _LABEL.match(key):
        raise ValueError(f"tasks.{key}: a task key must match {_LABEL.pattern} (it names a folder)")
    data = dict(data or {})
    common = {f.name for f in dataclasses.fields(TaskSpec)} - {"params"}
    params = {k: data.pop(k) for k in list(data) if k not in common}
    spec = build(TaskSpec, data, f"tasks.{key}", skip=("params",))
    spec.task = spec.task or key
    try:
        entry = get_task(spec.task)
    except ValueError as err:
        raise ValueError(f"tasks.{key}.task: {err}") from None
    fields = [f.name for f in dataclasses.fields(entry.task.Params)]
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown key(s) {[f'tasks.{key}.{u}' for u in unknown]}; accepted: {sorted(common) + fields}"
        )
    spec.params = build(entry.task.Params, {**entry.defaults, **params}, f"tasks.{key}")
    spec.validate(f"tasks.{key}")
    return spec


def _caches(items, key: str = "caches") -> list[CacheSpec]:
    """Expand `sweep: {name: [values]}` entries (params, or `strategy` itself), add the dynamic baseline, check
    strategies and their parameter names against the registry. Swept labels: `<label or strategy>-<name><value>`."""
    from kvpress_lite.registry import get_strategy

    if not isinstance(items, list):
        raise ValueError(f"{key} must be a list of {{strategy, label, params, sweep}} mappings, got {items!r}")
    specs = []
    for i, item in enumerate(items):
        at = f"{key}[{i}]"
        item = dict(item) if isinstance(item, dict) else item
        sweep = item.pop("sweep", {}) if isinstance(item, dict) else {}
        spec = build(CacheSpec, item, at)
        if not isinstance(sweep, dict) or not all(isinstance(v, list) and v for v in sweep.values()):
            raise ValueError(f"{at}.sweep={sweep!r} must map parameter names (or `strategy`) to non-empty lists")
        for combo in itertools.product(*sweep.values()):
            extra = dict(zip(sweep, combo))
            name = extra.pop("strategy", spec.strategy)
            try:
                strategy = get_strategy(name)
            except ValueError as err:
                raise ValueError(f"{at}.{'sweep.' if 'strategy' in sweep else ''}strategy: {err}") from None
            params = {**spec.params, **extra}
            unknown = sorted(set(params) - set(strategy.params))
            if unknown:
                raise ValueError(f"{at}.params: unknown parameter(s) {unknown} for strategy {name!r}; "
                                 f"accepted: {sorted(strategy.params)}")
            base = f"{spec.label}-{name}" if spec.label and "strategy" in sweep else spec.label or name
            label = "-".join([base] + [f"{k}{v}" for k, v in extra.items()])
            if not _LABEL.match(label):
                raise ValueError(f"{at}.label={label!r} must match {_LABEL.pattern} (it names a folder)")
            specs.append(CacheSpec(name, label, params))
    if not any(s.is_baseline for s in specs):
        specs.insert(0, CacheSpec("dynamic", "dynamic", {}))  # ratios are measured against it
    labels = [s.label for s in specs]
    for label in labels:
        if labels.count(label) > 1:
            raise ValueError(f"{key}: label {label!r} is used twice; labels must be unique")
    return sorted(specs, key=lambda s: not s.is_baseline)  # baseline first: the others' ratios read it


def recipe_from_dict(data: dict, name: str = "") -> Recipe:
    """Build and validate a Recipe from a merged mapping."""
    data = dict(data)
    tasks, caches = data.pop("tasks", None) or {}, data.pop("caches", None)
    perplexity = data.pop("perplexity", None)
    recipe = build(Recipe, data, "")
    recipe.name = recipe.name or name
    if not recipe.name:
        raise ValueError("name: a recipe needs a name (default: its file name)")
    if recipe.dtype not in DTYPES:
        raise ValueError(f"dtype={recipe.dtype!r} is not supported; accepted values: {list(DTYPES)}")
    check_device(recipe.device)  # unknown, or cuda without a GPU: fail before any model loads
    if perplexity is not None:
        recipe.perplexity = build(PerplexityConfig, perplexity, "perplexity")
        recipe.perplexity.validate("perplexity")
    if not isinstance(tasks, dict):
        raise ValueError(f"tasks must be a mapping of task key -> settings, got {tasks!r}")
    recipe.tasks = {key: _task(key, spec) for key, spec in tasks.items()}
    for key, part in [("perplexity", recipe.perplexity)] + [(f"tasks.{k}", t) for k, t in recipe.tasks.items()]:
        if part is not None and part.dtype is not None and part.dtype not in DTYPES:
            raise ValueError(f"{key}.dtype={part.dtype!r} is not supported; accepted values: {list(DTYPES)}")
    recipe.caches = _caches(caches if caches is not None else [{"strategy": "dynamic"}])
    for key, part in [("perplexity", recipe.perplexity)] + [(f"tasks.{k}", t) for k, t in recipe.tasks.items()]:
        if part is not None and part.caches is not None:
            part.caches = _caches(part.caches, f"{key}.caches")
    if recipe.perplexity is None and not recipe.tasks:
        raise ValueError("a recipe needs `perplexity` or at least one entry under `tasks`")
    return recipe


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe (with `include:`), apply `key.path=value` overrides, validate.

    Validation errors are ValueErrors that start with the recipe file (and the overrides, if any), then the key.
    """
    data = apply_overrides(read_recipe(path), overrides)
    try:
        return recipe_from_dict(data, Path(path).stem)
    except ValueError as err:
        where = f"{path}" + (f" with overrides {list(overrides)}" if overrides else "")
        raise ValueError(f"{where}: {err}") from None
