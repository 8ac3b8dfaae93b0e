"""The CPU kernels are compiled once per instruction set and picked at run time like torch's
own (ATEN_CPU_CAPABILITY overrides): every variant must agree with the reference."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_kernels_under_other_instruction_sets(capability):
    pytest.importorskip("recallprune._C")
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
        timeout=600,
        env={**os.environ, "ATEN_CPU_CAPABILITY": capability},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout
