"""The end-to-end study: files and their consistency, resume, determinism, bad input, the
report and analyze commands, and data-parallel runs under torchrun."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from recallprune.study import StudyError, runner
from recallprune.study.cli import main
from recallprune.study.config import StudyConfig, read_config_file, rounds_for
from recallprune.study.datasets import load_dataset
from recallprune.study.models import build_model, output_layer_name

from .studies import interrupt_evaluation

# These tests reach into the one-model-at-a-time runner (tests/test_batched.py covers the
# stacked grid and its agreement with this one).
TINY = [
    "--execution",
    "sequential",
    "--seeds",
    "0",
    "1",
    "--rounds",
    "3",
    "--epochs",
    "4",
    "--finetune-epochs",
    "1",
    "--criteria",
    "magnitude",
    "undecayed",
    "--device",
    "cpu",
]


def _study(out, *extra):
    code = main(["-q", "study", *TINY, *extra, "--out", str(out)])
    assert code == 0
    return json.loads((Path(out) / "results.json").read_text())


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "tiny"
    umask = os.umask(0o022)
    try:
        return out, _study(out)
    finally:
        os.umask(umask)


def test_output_files_have_the_usual_permissions(tiny_study):
    out, _ = tiny_study
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.parent.name for p in files} == {out.name, "runs", "checkpoints"}
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o644, path  # as open() makes them, not 0600
    assert not list(out.rglob("*.tmp"))


def test_files_and_their_consistency(tiny_study):
    out, results = tiny_study
    for name in (
        "config.json",
        "results.json",
        "results.csv",
        "report.md",
        "intensification.png",
        "recall_gaps.png",
        "accuracy.png",
    ):
        assert (out / name).is_file(), name
    runs = results["runs"]
    arms = {"dense", "control", "magnitude", "undecayed"}
    assert {r["criterion"] for r in runs} == arms
    assert len(runs) == 2 * (1 + 3 * 3)
    test_size = len(load_dataset("digits").y_test)
    for r in runs:
        confusion = np.asarray(r["confusion"])
        assert confusion.sum() == test_size  # every test example counted once
        assert r["accuracy"] == pytest.approx(np.trace(confusion) / test_size)
        assert r["support"] == confusion.sum(axis=1).tolist()
    # Sparsities follow the schedule: exact counts of 20% of the remaining weights.
    model = build_model("mlp", (1, 8, 8), 10)
    total = model.fc1.weight.numel() + model.fc2.weight.numel()
    expected, pruned = {}, 0
    for round_index in (1, 2, 3):
        pruned += round(0.2 * (total - pruned))
        expected[round_index] = pruned / total
    for r in runs:
        if r["criterion"] in ("magnitude", "undecayed"):
            assert r["sparsity"] == pytest.approx(expected[r["round"]], abs=1e-12)
            assert r["nominal_sparsity"] == pytest.approx(1 - 0.8 ** r["round"])
        elif r["criterion"] == "control":
            assert r["sparsity"] == 0.0
    # The dense ratio of every seed is exactly 1, by definition.
    summaries = results["analysis"]["summaries"]
    for s in summaries:
        if s["sparsity"] == 0.0:
            assert s["ratios"] == [1.0, 1.0]
    # The report's ratio table matches results.json.
    report = (out / "report.md").read_text()
    for s in summaries:
        row = re.search(rf"\| {s['criterion']} \| {s['sparsity']:.3f} \| ([0-9.\-]+) \[", report)
        assert row, (s["criterion"], s["sparsity"])
        assert float(row.group(1)) == pytest.approx(s["mean"], abs=5e-4)
        assert f"| {s['criterion']} | {s['sparsity']:.3f} |" in report
    assert "n/a ± n/a" not in report  # every accuracy cell filled
    assert "Does intensification grow with sparsity?" in report
    assert "weaker with UP than with magnitude" in report
    assert "de-intensification at low sparsity" in report
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == len(runs) + 1


def _bh(p):
    """Benjamini-Hochberg by hand (tests/test_distortion.py checks it against scipy)."""
    p = np.asarray(p, dtype=float)
    order = np.argsort(p)
    scaled = p[order] * len(p) / np.arange(1, len(p) + 1)
    out = np.empty(len(p))
    out[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return out


def test_results_fields_recomputed_from_the_raw_matrices(tiny_study):
    from scipy import stats
    from statsmodels.stats.power import TTestPower

    from recallprune import distortion as D

    out, results = tiny_study
    runs = results["runs"]
    dense = {r["seed"]: np.asarray(r["confusion"], dtype=float) for r in runs if r["round"] == 0}

    def gaps(counts):
        recall = np.diag(counts) / counts.sum(axis=1)
        return recall - np.trace(counts) / counts.sum()

    ratios = {}
    for r in runs:
        if r["criterion"] != "dense":
            d0, dt = gaps(dense[r["seed"]]), gaps(np.asarray(r["confusion"], dtype=float))
            key = (r["criterion"], round(r["nominal_sparsity"], 6))
            ratios.setdefault(key, {})[r["seed"]] = float(np.sum(d0 * dt) / np.sum(d0**2))
    summaries = {
        (s["criterion"], round(s["sparsity"], 6)): s for s in results["analysis"]["summaries"]
    }
    criteria_cells = sorted(k for k in ratios if k[0] != "control")
    raw_p, control_p = [], []
    for key in criteria_cells:
        s, values = summaries[key], ratios[key]
        control = ratios[("control", key[1])]
        seeds = sorted(values)
        x = np.array([values[k] for k in seeds])
        c = np.array([control[k] for k in seeds])
        assert s["n_seeds"] == len(seeds) == 2
        assert s["ratios"] == pytest.approx(list(x))
        assert s["mean"] == pytest.approx(x.mean())
        assert s["p_value"] == pytest.approx(stats.ttest_1samp(x, 1.0).pvalue)
        assert s["diff_vs_control"] == pytest.approx((x - c).mean())
        half = stats.t.ppf(0.975, 1) * stats.sem(x - c)
        assert s["diff_vs_control_ci_low"] == pytest.approx((x - c).mean() - half)
        assert s["diff_vs_control_ci_high"] == pytest.approx((x - c).mean() + half)
        assert s["p_vs_control"] == pytest.approx(stats.ttest_rel(x, c).pvalue)
        effect = TTestPower().solve_power(nobs=2, alpha=0.05, power=0.8)
        assert s["min_detectable_effect"] == pytest.approx(effect * np.std(x, ddof=1), rel=1e-5)
        noise = [
            D.measurement_sd(
                dense[k],
                np.asarray(
                    next(
                        r["confusion"]
                        for r in runs
                        if r["seed"] == k
                        and r["criterion"] == key[0]
                        and round(r["nominal_sparsity"], 6) == key[1]
                    )
                ),
                200,
                np.random.default_rng(D.bootstrap_seed(k, key[0], key[1])),
            )
            for k in seeds
        ]
        assert s["measurement_sd"] == pytest.approx(np.sqrt(np.mean(np.square(noise))))
        assert 0 < s["measurement_sd"] < 1
        raw_p.append(s["p_value"])
        control_p.append(s["p_vs_control"])
    adjusted = _bh(raw_p)
    adjusted_control = _bh(control_p)
    for key, p, q in zip(criteria_cells, adjusted, adjusted_control, strict=True):
        s = summaries[key]
        assert s["p_adjusted"] == pytest.approx(p)
        assert s["p_vs_control_adjusted"] == pytest.approx(q)
        assert s["verdict"] == D.verdict(s["mean"], p)
    for key, s in summaries.items():
        if key[0] == "control" or key[1] == 0:
            assert s["p_vs_control_adjusted"] in (None, s["p_vs_control_adjusted"])
        if key[0] == "control":
            assert s["diff_vs_control"] is None and s["p_vs_control"] is None
    # The environment the runs were computed in, in results.json and in the report.
    environment = results["environment"]
    assert environment["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert environment["torch"] == torch.__version__ and environment["device"] == "cpu"
    assert environment["threads"] == torch.get_num_threads()
    assert f"instruction set {environment['cpu_capability']}" in (out / "report.md").read_text()


def test_analyze_refuses_bad_input_with_clear_errors(tmp_path, capsys):
    good = [[40, 10], [5, 45]]
    base = {"dense": {"0": good, "1": [[42, 8], [6, 44]]}}
    record = {"seed": 0, "criterion": "mp", "sparsity": 0.5, "confusion": [[45, 5], [10, 40]]}
    cases = {
        "twice": (dict(base, pruned=[record, record]), "same seed, criterion and sparsity"),
        "negative": (
            dict(base, pruned=[dict(record, confusion=[[-51, 1], [8, 40]])]),
            "count [0, 0] = -51.0 is negative",
        ),
        "fraction": (
            dict(base, pruned=[dict(record, confusion=[[4.5, 1], [8, 40]])]),
            "is not a whole number",
        ),
        "nan": (
            dict(base, pruned=[dict(record, confusion=[[float("nan"), 1], [8, 40]])]),
            "is not finite",
        ),
        "huge": (
            dict(base, pruned=[dict(record, confusion=[[1e300, 1], [8, 40]])]),
            "larger than 2**53",
        ),
        "collide": (
            {"dense": {"0": good, "00": good}, "pruned": [record]},
            "seeds '0' and '00' are both seed 0",
        ),
        "fractional seed": (dict(base, pruned=[dict(record, seed=0.5)]), "is not an integer"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name.replace(' ', '-')}.json"
        path.write_text(json.dumps(content))
        assert main(["analyze", str(path)]) == 2, name
        err = capsys.readouterr().err
        assert message in err, (name, err)
    npz = tmp_path / "float-seeds.npz"
    np.savez(
        npz,
        dense=np.stack([good, good]),
        dense_seed=np.array([0.0, 1.5]),
        pruned=np.stack([good]),
        pruned_seed=np.array([0]),
        pruned_criterion=np.array(["mp"]),
        pruned_sparsity=np.array([0.5]),
    )
    assert main(["analyze", str(npz)]) == 2
    assert "dense_seed: seed 1.5 is not an integer" in capsys.readouterr().err
    # Whole-number float seeds are seeds.
    np.savez(
        npz,
        dense=np.stack([good, [[42, 8], [6, 44]]]),
        dense_seed=np.array([0.0, 1.0]),
        pruned=np.stack([[[45, 5], [10, 40]], [[46, 4], [12, 38]]]),
        pruned_seed=np.array([0.0, 1.0]),
        pruned_criterion=np.array(["mp", "mp"]),
        pruned_sparsity=np.array([0.5, 0.5]),
    )
    assert main(["analyze", str(npz)]) == 0
    assert "mp" in capsys.readouterr().out


def test_study_refuses_repeated_criteria(tmp_path, capsys):
    out = tmp_path / "twice"
    assert main(["-q", "study", *TINY, "--criteria", "magnitude", "magnitude", "--out", str(out)])
    assert "criteria must be distinct" in capsys.readouterr().err
    assert not (out / "config.json").exists()


def test_resume_after_interruption_gives_the_same_results(tiny_study, tmp_path, monkeypatch):
    _, complete = tiny_study
    out = tmp_path / "resumed"
    evaluate = interrupt_evaluation(monkeypatch, at=9)
    assert main(["-q", "study", *TINY, "--out", str(out)]) == 130
    saved = sorted(p.name for p in (out / "runs").iterdir())
    assert len(saved) == 8 and not (out / "results.json").exists()
    monkeypatch.setattr(runner, "evaluate", evaluate)
    resumed = _study(out)

    def strip(runs):
        return sorted(
            json.dumps({k: v for k, v in r.items() if k != "seconds"}, sort_keys=True) for r in runs
        )

    assert strip(resumed["runs"]) == strip(complete["runs"])  # deterministic, resumed or not
    # A third run reuses everything.
    again = _study(out)
    assert strip(again["runs"]) == strip(complete["runs"])


def test_report_command_rebuilds(tiny_study, tmp_path):
    out, _ = tiny_study
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "report.md").unlink()
    (copy / "accuracy.png").unlink()
    assert main(["-q", "report", str(copy)]) == 0
    assert (copy / "report.md").read_text() == (out / "report.md").read_text()
    assert (copy / "accuracy.png").stat().st_size > 1000


def test_bad_input(tiny_study, tmp_path, capsys):
    out, _ = tiny_study
    with pytest.raises(SystemExit) as exit_status:
        main(["-q", "study", "--dataset", "imagenet", "--out", str(tmp_path / "a")])
    assert exit_status.value.code == 2
    assert "invalid choice: 'imagenet'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert main(["-q", "study", *TINY, "--model", "resnet9000", "--out", str(tmp_path / "b")]) == 2
    assert "unknown model 'resnet9000'" in capsys.readouterr().err
    code = main(
        [
            "-q",
            "study",
            *TINY,
            "--dataset",
            "mnist",
            "--data-root",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "c"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in err and "--download" in err

    # Another study's folder: refused, nothing overwritten.
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["-q", "study", *TINY, "--lr", "0.2", "--out", str(out)]) == 2
    assert "holds another study (its config differs in lr)" in capsys.readouterr().err
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    # A corrupt results.json: clear errors from report and from study, file left as it is.
    corrupt = tmp_path / "corrupt"
    shutil.copytree(out, corrupt)
    (corrupt / "results.json").write_text('{"config": {"dataset": "dig')
    assert main(["-q", "report", str(corrupt)]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err
    assert main(["-q", "study", *TINY, "--out", str(corrupt)]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err
    assert (corrupt / "results.json").read_text() == '{"config": {"dataset": "dig'
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    assert main(["-q", "study", *TINY, "--out", str(stranger)]) == 2
    assert "holds no study" in capsys.readouterr().err


def test_config_file_and_flag_override(tmp_path):
    config = tmp_path / "study.toml"
    config.write_text(
        "[study]\nseeds = [3]\nrounds = 2\nepochs = 2\nfinetune-epochs = 1\n"
        'criteria = ["random"]\nlr = 0.1\n'
    )
    out = tmp_path / "fromfile"
    assert (
        main(
            [
                "-q",
                "study",
                "--config",
                str(config),
                "--lr",
                "0.07",
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    saved = json.loads((out / "config.json").read_text())
    assert saved["seeds"] == [3] and saved["rounds"] == 2 and saved["criteria"] == ["random"]
    assert saved["lr"] == 0.07  # the flag wins over the file
    bad = tmp_path / "bad.toml"
    bad.write_text("learning_rate = 3\n")
    with pytest.raises(StudyError, match=f"config file {bad}: unknown setting 'learning_rate'"):
        read_config_file(bad)
    with pytest.raises(ValueError, match="unknown setting 'learning_rate'"):
        StudyConfig.from_dict({"learning_rate": 3})


def test_analyze_command_json_and_npz(tmp_path, capsys):
    rng = np.random.default_rng(0)

    def confusion(correct):
        c = np.diag(correct)
        c[np.arange(4), (np.arange(4) + 1) % 4] = 100 - np.asarray(correct)
        return c

    dense = {s: confusion([80, 75, 70, 65] + rng.integers(-2, 3, 4)) for s in range(4)}
    pruned = []
    for s in range(4):
        pruned.append(
            {
                "seed": s,
                "criterion": "mp",
                "sparsity": 0.9,
                "confusion": confusion([88, 77, 68, 57] + rng.integers(-2, 3, 4)).tolist(),
            }
        )
    path = tmp_path / "m.json"
    path.write_text(
        json.dumps({"dense": {str(k): v.tolist() for k, v in dense.items()}, "pruned": pruned})
    )
    assert main(["analyze", str(path), "--out", str(tmp_path / "a.json")]) == 0
    text = capsys.readouterr().out
    assert "mp" in text and "intensification" in text
    from_json = json.loads((tmp_path / "a.json").read_text())
    npz = tmp_path / "m.npz"
    np.savez(
        npz,
        dense=np.stack(list(dense.values())),
        dense_seed=np.arange(4),
        pruned=np.stack([np.asarray(p["confusion"]) for p in pruned]),
        pruned_seed=np.arange(4),
        pruned_criterion=np.array(["mp"] * 4),
        pruned_sparsity=np.full(4, 0.9),
    )
    assert main(["analyze", str(npz), "--out", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text()) == from_json
    (tmp_path / "broken.json").write_text('{"dense": {}}')
    assert main(["analyze", str(tmp_path / "broken.json")]) == 2


def test_datasets_and_models():
    easy = load_dataset("synthetic", difficulty=0.5)
    hard = load_dataset("synthetic", difficulty=4.0, imbalance=1.0)
    assert easy.input_shape == (40,) and easy.num_classes == 10
    counts = torch.bincount(hard.y_train, minlength=10)
    assert counts[0] > 2 * counts[-1]  # imbalanced
    for name, shape in (
        ("cnn", (1, 8, 8)),
        ("resnet20", (3, 32, 32)),
        ("vgg11", (3, 32, 32)),
        ("resnet18", (1, 28, 28)),
        ("mlp", (40,)),
    ):
        model = build_model(name, shape, 7).eval()
        assert model(torch.randn(2, *shape)).shape == (2, 7)
    assert output_layer_name(build_model("mlp", (40,), 3)) == "fc3"
    assert output_layer_name(build_model("resnet20", (3, 32, 32), 3)) == "fc"
    with pytest.raises(ValueError, match="needs image inputs"):
        build_model("cnn", (40,), 3)
    with pytest.raises(ValueError, match="at least 32x32"):
        build_model("vgg16", (1, 8, 8), 3)
    assert rounds_for(0.98, 0.2) == 18


def test_data_parallel_under_torchrun(tmp_path):
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "recallprune",
        "-q",
        "study",
        "--seeds",
        "0",
        "--rounds",
        "2",
        "--epochs",
        "2",
        "--finetune-epochs",
        "1",
        "--criteria",
        "magnitude",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    test_size = len(load_dataset("digits").y_test)
    assert len(results["runs"]) == 1 + 2 * 2
    for r in results["runs"]:
        assert np.asarray(r["confusion"]).sum() == test_size  # both ranks' shards, summed
    assert result.stdout.count("study done") == 1  # only rank 0 writes and reports
