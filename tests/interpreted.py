"""Runs a command under Triton's CPU interpreter in a subprocess, for the tests that check the GPU kernels on a CPU.

TRITON_INTERPRET must be set before triton is imported, hence the subprocess; this checkout comes first on its
PYTHONPATH (a script's own folder, tests/ or benchmarks/, would otherwise leave `kvpress_lite` to whichever copy is
installed), one torch thread.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]


def run_interpreted(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """`python *args` from the checkout's root under the interpreter (skips the test without triton or numpy); fails
    the test with the end of stderr if it exits non-zero."""
    pytest.importorskip("triton", reason="triton is not installed (optional dependency)")
    pytest.importorskip("numpy", reason="Triton's interpreter needs numpy")
    path = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def interpreted_json(script: str, timeout: int = 600):
    """The JSON on the last stdout line of `python script --interpret` (the test file's own interpreted half)."""
    return json.loads(run_interpreted([script, "--interpret"], timeout).stdout.strip().splitlines()[-1])
