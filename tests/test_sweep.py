"""``recallprune sweep``: a grid of studies from one file, compared; the regression of the
comparison against numpy on the sweep's pooled CSV; an interrupted sweep resumed; the
refusals of bad sweep files."""

import csv
import json
import os

import numpy as np
import pytest

from recallprune.study import grid
from recallprune.study.cli import main

pytest.importorskip("statsmodels")

SHARED = """
[study]
seeds = [0, 1]
rounds = 2
epochs = 2
finetune_epochs = 1
criteria = ["magnitude", "undecayed"]
device = "cpu"
"""
VARYING = """
[sweep]
width = [0.25, 1.0]
train_fraction = [0.3, 1.0]
"""
NAMES = [
    "width=0.25,train_fraction=0.3",
    "width=0.25,train_fraction=1.0",
    "width=1.0,train_fraction=0.3",
    "width=1.0,train_fraction=1.0",
]


def _write(tmp_path, text, name="sweep.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sweep")
    out = tmp_path / "out"
    assert main(["-q", "sweep", _write(tmp_path, SHARED + VARYING), "--out", str(out)]) == 0
    return out


def test_a_sweep_runs_every_combination_and_compares_them(finished):
    studies = sorted(p.name for p in (finished / "studies").iterdir())
    assert studies == sorted(NAMES)
    results = {
        name: json.loads((finished / "studies" / name / "results.json").read_text())
        for name in NAMES
    }
    for name, result in results.items():
        width, fraction = (float(part.split("=")[1]) for part in name.split(","))
        assert result["config"]["width"] == width
        assert result["config"]["train_fraction"] == fraction
        assert result["config"]["seeds"] == [0, 1]
    # The width changes the model's size, the training fraction its training set.
    params = {name: r["model"]["params"] for name, r in results.items()}
    assert params[NAMES[0]] == params[NAMES[1]] < params[NAMES[2]] == params[NAMES[3]]
    samples = {name: r["model"]["train_samples"] for name, r in results.items()}
    assert samples[NAMES[0]] < samples[NAMES[1]] and samples[NAMES[2]] < samples[NAMES[3]]
    compared = json.loads((finished / "compare" / "compare.json").read_text())
    assert [s["name"] for s in compared["studies"]] == NAMES
    assert {c["criterion"] for c in compared["coefficients"]} == {
        "magnitude",
        "undecayed",
        "control",
    }
    assert len(compared["answers"]) == 5


def test_the_comparison_against_numpy_on_the_sweeps_csv(finished):
    with open(finished / "compare" / "compare.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["study"] for r in rows} == set(NAMES)
    compared = json.loads((finished / "compare" / "compare.json").read_text())
    for criterion in ("magnitude", "undecayed", "control"):
        chosen = [r for r in rows if r["criterion"] == criterion and float(r["sparsity"]) > 0]
        x = np.array(
            [
                [1.0, float(r["sparsity"]), float(r["dense_error"]), np.log2(float(r["params"]))]
                for r in chosen
            ]
        )
        y = np.array([float(r["ratio"]) for r in chosen])
        expected, *_ = np.linalg.lstsq(x, y, rcond=None)
        got = {
            c["term"]: c["estimate"]
            for c in compared["coefficients"]
            if c["criterion"] == criterion
        }
        terms = ["intercept", "sparsity", "dense_error", "log2_params"]
        np.testing.assert_allclose([got[t] for t in terms], expected, rtol=1e-7, atol=1e-9)


def test_an_interrupted_sweep_resumes(tmp_path, finished, monkeypatch, capsys):
    file = _write(tmp_path, SHARED + VARYING)
    out = tmp_path / "out"
    original = grid.BatchedStudy.round_stage
    calls = {"n": 0}

    def stop_in_the_third_study(self, round_index, data, bar):
        calls["n"] += 1
        if calls["n"] == 5:  # two rounds per study: round 1 of the third
            raise KeyboardInterrupt
        return original(self, round_index, data, bar)

    monkeypatch.setattr(grid.BatchedStudy, "round_stage", stop_in_the_third_study)
    assert main(["-q", "sweep", file, "--out", str(out)]) == 130
    assert f"sweep {file} --out {out}" in capsys.readouterr().err
    done = [out / "studies" / name / "results.json" for name in NAMES[:2]]
    assert all(p.exists() for p in done)
    assert not (out / "studies" / NAMES[2] / "results.json").exists()
    assert not (out / "compare").exists()
    stamps = [os.stat(p).st_mtime_ns for p in done]
    monkeypatch.setattr(grid.BatchedStudy, "round_stage", original)
    assert main(["-q", "sweep", file, "--out", str(out)]) == 0
    assert [os.stat(p).st_mtime_ns for p in done] == stamps  # reused, not rerun
    for name in NAMES:
        mine = json.loads((out / "studies" / name / "results.json").read_text())["runs"]
        theirs = json.loads((finished / "studies" / name / "results.json").read_text())["runs"]
        assert [r["sparsity"] for r in mine] == [r["sparsity"] for r in theirs]
    assert (out / "compare" / "compare.md").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (SHARED, "expected a [sweep] table"),
        (SHARED + VARYING + "\n[training]\nepochs = 2\n", "'training'"),
        (SHARED + "\n[sweep]\nwidth = 0.5\n", "[sweep] width must be a non-empty list"),
        (SHARED + "\n[sweep]\nwidht = [0.5]\n", "did you mean 'width'?"),
        (SHARED + "\n[sweep]\nwidth = [0.5, 0.5]\n", "lists a value twice"),
        (SHARED + "\n[sweep]\nseeds = [[0], [1]]\n", "seeds is both shared"),
        (SHARED + "\n[sweep]\nout = ['a', 'b']\n", "the sweep sets for each study"),
        (SHARED + "\n[sweep]\nbatch_size = [16, 'two']\n", "[sweep] batch_size"),
        (
            SHARED + "\n[sweep]\nmodel = ['mlp', 'resnet20']\nwidth = [0.5]\n",
            "sweep study model=resnet20,width=0.5: width applies to the mlp and cnn",
        ),
    ],
)
def test_bad_sweep_files_are_refused_before_anything_runs(tmp_path, capsys, text, message):
    out = tmp_path / "out"
    assert main(["-q", "sweep", _write(tmp_path, text), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_folder_of_another_sweep_is_refused(tmp_path, finished, capsys):
    other = SHARED + "\n[sweep]\nwidth = [0.5]\n"
    assert main(["-q", "sweep", _write(tmp_path, other), "--out", str(finished)]) == 2
    assert "holds another sweep" in capsys.readouterr().err
