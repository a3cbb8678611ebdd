"""Real text available offline: Python's own `pydoc_data.topics`, local files, or `datasets` names."""

from __future__ import annotations

import os


def pydoc_text() -> str:
    """The Python language reference prose shipped with every CPython (~1 MB of English text)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def load_text(source: str = "pydoc") -> str:
    """Return a long text from `source`.

    Args:
        source: `"pydoc"` (offline default), a local text file path, or `"datasets:NAME[:CONFIG[:SPLIT]]"`
            (e.g. `datasets:wikitext:wikitext-2-raw-v1:test`; needs network or a local datasets cache).
    """
    if source == "pydoc":
        return pydoc_text()
    if source.startswith("datasets:"):
        from datasets import load_dataset

        parts = source.split(":")[1:]
        name, config = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
        split = parts[2] if len(parts) > 2 else "test"
        data = load_dataset(name, config, split=split)
        column = "text" if "text" in data.column_names else data.column_names[0]
        return "\n".join(row for row in data[column] if row)
    if os.path.isfile(source):
        with open(source, encoding="utf-8") as handle:
            return handle.read()
    raise ValueError(
        f"text source={source!r} not found; accepted: 'pydoc', a local file path, or 'datasets:NAME[:CONFIG[:SPLIT]]'"
    )
