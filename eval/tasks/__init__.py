"""Task registry: one module per long-context task, variants as registered parameter defaults (lm-eval style).

A task is a class with a `Params` dataclass, `default_haystack`, `sample(params, prompter, length, depth, rng)
-> Sample`, `extract(generation, params) -> str` and `max_new_tokens(params) -> int`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from kvpress_lite.registry import Registry

from .base import Prompter, Sample  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class TaskEntry:
    """A registered task: the implementing class plus parameter defaults that make this variant."""

    name: str
    task: Any
    summary: str
    defaults: dict = field(default_factory=dict)

    def params(self, **values):
        """The task's `Params` with this variant's defaults, then `values`; unknown names raise ValueError."""
        fields = {f.name for f in dataclasses.fields(self.task.Params)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"task {self.name!r} got unknown parameter(s) {unknown}; accepted: {sorted(fields)}")
        return self.task.Params(**{**self.defaults, **values})


TASKS: Registry = Registry("task", "tasks")


def register_task(name: str, summary: str, **defaults):
    """Decorator registering a task class (or, called again on it, a variant with other defaults)."""

    def decorator(task):
        TASKS.add(name, TaskEntry(name, task(), summary, defaults))
        return task

    return decorator


def get_task(name: str) -> TaskEntry:
    """Look up a task; unknown names raise a ValueError listing the registered ones."""
    return TASKS.lookup(name)


from . import niah, passkey, variable_tracking  # noqa: E402,F401  (register the tasks)
