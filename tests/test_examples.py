"""The demo example runs as written and reports what it claims."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_pruned_example():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_pruned.py"), "--epochs", "12"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "pruned weights still exactly zero after fine-tuning: True" in out
    assert re.search(r"\(90\.0%\) by magnitude", out)
    dense = float(re.search(r"dense model: test accuracy ([0-9.]+)", out).group(1))
    pruned = float(re.search(r"after fine-tuning: test accuracy ([0-9.]+)", out).group(1))
    assert dense > 0.9 and pruned > 0.85
