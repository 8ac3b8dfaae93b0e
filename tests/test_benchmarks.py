"""The benchmark scripts run (smoke runs, --quick) and record what they claim. Their timings
are not tested: speed is measured by running them, never asserted in the suite."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run_script(script, out, *flags):
    """A --quick CPU run of ``script`` writing to ``out``; returns what it printed."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / script),
            "--quick",
            "--device",
            "cpu",
            "--out",
            str(out),
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _run(script, out):
    _run_script(script, out)
    return json.loads(out.read_text())


def _common():
    """benchmarks/_common.py, imported by path (benchmarks/ is not a package)."""
    name = "recallprune_benchmarks_common"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "_common.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


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
    assert {case["dtype"] for case in cases} == {"fp32", "bf16", "fp16", "fp64"}
    assert cases and all(all(case["counts_match_bincount"].values()) for case in cases)


def test_bench_stacked_linear_smoke(tmp_path):
    pytest.importorskip("recallprune._C")
    data = _run("bench_stacked_linear.py", tmp_path / "stacked-linear.json")
    cases = data["runs"][0]["cases"]
    layers = [case for case in cases if case["layer"] != "mlp"]
    assert {tuple(case["layer"]) for case in layers} == {(64, 300), (300, 100), (100, 10)}
    names = {case["case"] for case in layers}
    assert names >= {"bmm", "dense", "compact 1", "compact 0.2", "compact 0.05"}
    mlp = [case for case in cases if case["layer"] == "mlp"]
    assert {(case["density"], case["case"]) for case in mlp} == {
        (density, name)
        for density in (None, 0.2, 0.05)
        for name in ("autograd bmm", "autograd kernels", "fused")
    }
    assert all(case["median_ms"] > 0 and case["matches_torch"] for case in cases)


def test_bench_mask_hook_smoke(tmp_path):
    data = _run("bench_mask_hook.py", tmp_path / "mask-hook.json")
    (workload,) = data["runs"][0]["workloads"]
    methods = {m["method"]: m for m in workload["methods"]}
    for name in ("SGD", "Adam", "AdamW"):
        assert methods[name]["median_ms"] > 0
        assert methods[f"{name} + hook"]["ratio_to_without"] > 0
    assert methods["hook alone"]["median_ms"] > 0 and not workload["errors"]


@pytest.mark.parametrize(
    "script, flags",
    [
        ("bench_confusion.py", ["--classes", "10", "--sizes", "256", "--dtypes", "fp32"]),
        ("bench_optimizer.py", ["--workloads", "small-2000"]),
    ],
)
def test_capability_runs_in_a_subprocess_and_is_recorded(tmp_path, script, flags):
    pytest.importorskip("recallprune._C")
    out = tmp_path / "result.json"
    stdout = _run_script(script, out, "--capability", "default", *flags)
    assert "== CPU, default" in stdout
    assert not out.exists()  # the run started for the capability names its own file
    data = json.loads((tmp_path / "result-default.json").read_text())
    environment = data["runs"][0]["environment"]
    assert environment["cpu_capability"] == "DEFAULT"
    assert environment["aten_cpu_capability_env"] == "default"
    assert environment["cpu_model"]


def test_result_file_names_carry_the_cpu_capability():
    common = _common()
    cpu = torch.device("cpu")
    path = common.result_path("confusion", cpu, "avx2", False, None)
    assert path.name == f"confusion-{common.slugify(common.cpu_model())}-avx2.json"
    assert path.parent == ROOT / "benchmarks" / "results"
    assert common.result_path("confusion", cpu, "avx512", True, None).name.endswith(
        "-avx512-quick.json"
    )
    assert common.result_path("x", cpu, "default", False, Path("a/b.json")) == Path(
        "a/b-default.json"
    )
    assert common.result_path("x", cpu, None, False, Path("a/b.json")) == Path("a/b.json")
    assert "default" in common.supported_cpu_capabilities()
