"""What a run records about where it ran: seeds (set in one place), versions, hardware, memory."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA): the only place the harness seeds anything."""
    import transformers

    transformers.set_seed(seed)


def git_sha() -> str | None:
    """HEAD of the repository holding this package, `+dirty` when the tree has changes; None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha.strip() + ("+dirty" if dirty.strip() else "")


def versions() -> dict:
    import accelerate
    import transformers

    import kvpress_lite

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "kvpress_lite": kvpress_lite.__version__,
        "git_sha": git_sha(),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: str, num_processes: int = 1) -> dict:
    info = {
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "num_processes": num_processes,
        "gpu": None,
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


class MemoryMeter:
    """Peak device memory of a block: CUDA `max_memory_allocated`. On CPU nothing process-wide is meaningful
    (torch's CPU allocator keeps no peak, and RSS mixes in the model and other runs), so `bytes` is None there;
    the cache's own peak is `kv_bytes_max` (its resident bytes sampled after every forward)."""

    def __init__(self, device: str):
        self.cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        self.device = torch.device(device) if self.cuda else None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.result = {"kind": "cuda_max_memory_allocated", "bytes": torch.cuda.max_memory_allocated(self.device)}
        else:
            self.result = {"kind": None, "bytes": None}
        return False
