"""YAML recipes with `include:` and `key.path=value` CLI overrides, merged into one plain mapping.

Merge rule: mappings merge key by key, anything else (lists included) replaces; `null` removes a key or list item.
Override paths step into lists by index or by an item's `label` (else `strategy`): `caches.int4.params.bits=2`.
"""

from __future__ import annotations

from pathlib import Path

import yaml


def deep_merge(base: dict, override: dict) -> dict:
    """`override` merged onto `base` (new dict); a `None` value removes the key."""
    merged = dict(base)
    for key, value in override.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_recipe(path: str | Path, _chain: tuple = ()) -> dict:
    """Load a YAML recipe, resolving `include:` (a path or list of paths, relative to the including file)."""
    path = Path(path).resolve()
    if path in _chain:
        raise ValueError(f"include: cycle through {path}")
    if not path.is_file():
        raise ValueError(f"recipe {str(path)!r} not found" + (f" (included from {_chain[-1]})" if _chain else ""))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"recipe {path}: {_yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} must be a YAML mapping of keys (model, perplexity, tasks, caches...)")
    includes = data.pop("include", None) or []
    merged: dict = {}
    for include in [includes] if isinstance(includes, str) else includes:
        merged = deep_merge(merged, read_recipe(path.parent / include, _chain + (path,)))
    return deep_merge(merged, data)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """`line L, column C: <problem>` of a PyYAML error, on one line."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = " ".join(filter(None, [getattr(err, "context", None), getattr(err, "problem", None)])) or str(err)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}invalid YAML ({' '.join(problem.split())})"


def _list_index(items: list, parts: list[str], at: int, key: str) -> tuple[int, int]:
    """(index, parts consumed) of the list item named by `parts[at:]`: an integer or a (possibly dotted) label."""
    if parts[at].isdigit() and int(parts[at]) < len(items):
        return int(parts[at]), 1
    for width in range(len(parts) - at, 0, -1):
        name = ".".join(parts[at : at + width])
        for i, item in enumerate(items):
            if isinstance(item, dict) and name in (item.get("label"), item.get("strategy")):
                return i, width
    raise ValueError(f"override {key!r}: no list item {parts[at]!r} (use an index < {len(items)} or a label)")


def apply_overrides(data: dict, overrides) -> dict:
    """Apply `key.path=value` strings (values parsed as YAML) to a copy of `data`."""
    data = yaml.safe_load(yaml.safe_dump(data))  # deep copy
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key.path=value (e.g. tasks.passkey.samples=5)")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as err:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)})") from None
        parts, node, at = key.split("."), data, 0
        while True:
            if isinstance(node, list):
                index, width = _list_index(node, parts, at, key)
                last = at + width == len(parts)
                if last:
                    if value is None:
                        node.pop(index)
                    else:
                        node[index] = value
                    break
                node, at = node[index], at + width
            elif isinstance(node, dict):
                part = parts[at]
                if at == len(parts) - 1:
                    if value is None:
                        node.pop(part, None)
                    else:
                        node[part] = value
                    break
                if not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
                node, at = node[part], at + 1
            else:
                raise ValueError(f"override {key!r}: {'.'.join(parts[:at])} is not a mapping or list")
    return data
