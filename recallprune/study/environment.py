"""What a study ran on: versions, the CPU and the instruction set torch uses, the device, the
kernels, the thread count. Training is chaotic, so two reports that differ in any of these
can differ in their numbers; the report records them so that a reader can tell why."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch


def _git_commit() -> str | None:
    """The checkout's commit (``+dirty`` with uncommitted changes), when the package runs from
    a git checkout and git is there."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: str) -> dict[str, Any]:
    """The environment of a study run on ``device``."""
    from .. import __version__
    from ..ops import has_ops

    target = torch.device(device)
    environment = {
        "recallprune": __version__,
        "git_commit": _git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "aten_cpu_capability_env": os.environ.get("ATEN_CPU_CAPABILITY"),
        "threads": torch.get_num_threads(),
        "device": str(target),
        "device_name": None,
        "backend": "kernel" if has_ops(target) else "reference",
    }
    if target.type == "cuda" and torch.cuda.is_available():
        environment["device_name"] = torch.cuda.get_device_name(target)
    return environment
