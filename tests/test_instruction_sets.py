"""The CPU kernels are compiled once per instruction set and picked at run time like torch's
own (ATEN_CPU_CAPABILITY overrides): every variant must agree with the reference."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _torch_capability(env):
    """The instruction set torch picks under ``env`` (it falls back when the CPU lacks the
    one ATEN_CPU_CAPABILITY asks for)."""
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    return result.stdout.strip().lower()


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_kernels_under_each_instruction_set(capability):
    pytest.importorskip("recallprune._C")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    if _torch_capability(env) != capability:
        pytest.skip(f"this CPU does not have {capability}")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "tests/test_undecayed_sgd.py",
            "tests/test_confusion.py",
            "-k",
            "kernel or property or pruned or decay or average",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout
