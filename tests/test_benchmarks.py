"""The benchmark scripts run (smoke runs, --quick) and record what they claim. Their timings
are not tested: speed is measured by running them, never asserted in the suite."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script, out):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / script),
            "--quick",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_bench_optimizer_smoke(tmp_path):
    pytest.importorskip("recallprune._C")
    data = _run("bench_optimizer.py", tmp_path / "optimizer.json")
    workloads = data["runs"][0]["workloads"]
    assert {w["name"] for w in workloads} >= {"resnet18", "single-16M", "small-2000"}
    for workload in workloads:
        methods = {m["method"]: m for m in workload["methods"]}
        for name in (
            "SGD for-loop",
            "SGD foreach",
            "SGD fused",
            "SGD fused + bool mask",
            "UndecayedSGD 50% pruned",
            "UndecayedSGD 90% pruned",
        ):
            assert methods[name]["median_ms"] > 0
        assert workload["copy"]["gbps"] > 0


def test_bench_confusion_smoke(tmp_path):
    pytest.importorskip("recallprune._C")
    data = _run("bench_confusion.py", tmp_path / "confusion.json")
    cases = data["runs"][0]["cases"]
    assert cases and all(case["counts_match_bincount"] for case in cases)


def test_bench_mask_hook_smoke(tmp_path):
    data = _run("bench_mask_hook.py", tmp_path / "mask-hook.json")
    (workload,) = data["runs"][0]["workloads"]
    methods = {m["method"]: m for m in workload["methods"]}
    for name in ("SGD", "Adam", "AdamW"):
        assert methods[name]["median_ms"] > 0
        assert methods[f"{name} + hook"]["ratio_to_without"] > 0
    assert methods["hook alone"]["median_ms"] > 0 and not workload["errors"]
