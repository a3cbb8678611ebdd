"""The python snippets of README.md and docs/extending.md run as written, in order, on the embedded SmolLM2 model (a
broken snippet fails CI). Each document runs in its own process: the extending example registers a policy, which
must not leak into the other tests' registry."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(doc: str) -> list[str]:
    text = (ROOT / doc).read_text()
    blocks = BLOCK.findall(text)
    assert len(blocks) == text.count("```python"), f"{doc}: a python block was not extracted"
    return blocks


@pytest.mark.model
@pytest.mark.parametrize("doc, expected", [
    ("README.md", "the list in-place"),  # the first snippet's printed continuation, as its comment shows
    ("docs/extending.md", None),
])
def test_python_snippets_run_as_written(doc, expected, tmp_path):
    blocks = python_blocks(doc)
    assert blocks, f"{doc} has no python snippet"
    script = tmp_path / "snippets.py"
    script.write_text("\n\n".join(blocks))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"{doc}: a snippet failed\n{proc.stderr[-4000:]}"
    if expected:
        assert expected in proc.stdout, proc.stdout


def _slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("doc", ["README.md", "recipes/README.md", "docs/results.md", "docs/caches.md",
                                 "docs/extending.md"])
def test_relative_links_resolve(doc):
    """Every relative link of these documents points at a file of the repository, and its #anchor at a heading."""
    path = ROOT / doc
    links = re.findall(r"\]\(([^)\s]+)\)", path.read_text())
    assert links
    for link in links:
        if link.startswith(("http://", "https://")):
            continue
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        assert file.exists(), f"{doc}: link {link!r} points at a missing file"
        if anchor and file.suffix == ".md":
            headings = [_slug(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)]
            assert anchor in headings, f"{doc}: link {link!r}: no heading with that anchor in {file.name}"
