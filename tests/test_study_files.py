"""The study's files: OS errors and unreadable files said in one line naming the file,
atomic writes that leave no temporary file behind, results files of the wrong shape refused
and left as they are, and honest resume (the exact command, ``--resume DIR``)."""

import errno
import json
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from recallprune.study import StudyError, runner
from recallprune.study import files as study_files
from recallprune.study.cli import _resumed_config, build_parser, main
from recallprune.study.folder import StudyFolder

from .studies import MINI, interrupt_evaluation


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.splitlines()[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished study, copied by the tests that change it."""
    out = tmp_path_factory.mktemp("finished") / "study"
    assert main(["-q", "study", *MINI, "--out", str(out)]) == 0
    return out


@pytest.fixture
def failed_start(tmp_path, monkeypatch, capsys):
    """A folder whose study stopped before its first run finished: config.json only."""
    out = tmp_path / "started"

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    with monkeypatch.context() as patch:
        patch.setattr(runner, "train", crash)
        assert main(["-q", "study", *MINI, "--out", str(out)]) == 2
    assert "simulated crash" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    return out


# -- atomic writes ---------------------------------------------------------------------------


def test_atomic_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")

    def fails(handle):
        handle.write(b"half of the new")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(StudyError, match=f"cannot write {path}: no space left on the device"):
        study_files.atomic_write(path, fails)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]

    def interrupted(handle):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        study_files.atomic_write(path, interrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_files_written_behind_keep_their_order_and_stop_at_the_first_failure(tmp_path, monkeypatch):
    folder = StudyFolder(tmp_path / "study")
    runs = [(seed, folder.record_path(seed, "magnitude", 1)) for seed in range(4)]
    real_open = os.open
    written = []

    def failing_open(path, *args, **kwargs):
        written.append(Path(path).name.split(".")[1])
        if "seed1-magnitude-r01.pt" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(study_files.os, "open", failing_open)

    def save(seed, path):
        checkpoint = {"w": torch.full((2,), float(seed))}
        folder.save({"seed": seed}, path, checkpoint, folder.checkpoint_path(seed, "magnitude", 1))

    with pytest.raises(StudyError, match="seed1-magnitude-r01.pt: no space left on the device"):
        with folder.writing_behind():
            save(*runs[0])
            assert folder.load_record(runs[0][1]) == {"seed": 0}  # reads wait for the writes
            for seed, path in runs[1:]:
                save(seed, path)
    # Written in order (checkpoint, then record); nothing after the failed checkpoint.
    assert written == ["seed0-magnitude-r01", "seed0-magnitude-r01", "seed1-magnitude-r01"]
    assert [p.name for p in (tmp_path / "study" / "runs").iterdir()] == ["seed0-magnitude-r01.json"]
    saved = study_files.load_checkpoint(folder.checkpoint_path(0, "magnitude", 1))
    assert torch.equal(saved["w"], torch.zeros(2))
    assert len(list((tmp_path / "study" / "checkpoints").iterdir())) == 1  # no temporary
    # Outside, writes are done at once again.
    folder.save({"seed": 9}, tmp_path / "study" / "now.json")
    assert folder.load_record(tmp_path / "study" / "now.json") == {"seed": 9}


def test_checkpoints_handed_over_are_serialised_by_the_writing_thread(tmp_path, monkeypatch):
    import threading

    folder = StudyFolder(tmp_path / "study")
    real_save = torch.save
    threads = []

    def spying_save(obj, f, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", spying_save)
    kept, given = (torch.arange(4.0), torch.arange(4.0))
    with folder.writing_behind():
        # Not handed over: serialised at once, so a change right after does not reach the file.
        folder.save({}, tmp_path / "a.json", {"w": kept}, folder.checkpoint_path(0, "m", 1))
        kept.fill_(-1.0)
        folder.save(
            {}, tmp_path / "b.json", {"w": given}, folder.checkpoint_path(1, "m", 1), owned=True
        )
    assert threads[0] == threading.current_thread().name
    assert threads[1].startswith("recallprune-writer")
    assert torch.equal(study_files.load_checkpoint(folder.checkpoint_path(0, "m", 1))["w"], given)
    assert torch.equal(study_files.load_checkpoint(folder.checkpoint_path(1, "m", 1))["w"], given)
    # Outside writing_behind, an owned checkpoint is written at once.
    folder.save(
        {}, tmp_path / "c.json", {"w": given}, folder.checkpoint_path(2, "m", 1), owned=True
    )
    assert threads[2] == threading.current_thread().name


def test_a_batched_study_whose_disk_fills_resumes(tmp_path, capsys, monkeypatch):
    args = ["--seeds", "0", "1", "--rounds", "3", "--epochs", "2", "--finetune-epochs", "1"]
    args += ["--criteria", "magnitude", "random", "--device", "cpu"]
    complete, out = tmp_path / "complete", tmp_path / "out"
    assert main(["-q", "study", *args, "--out", str(complete)]) == 0
    real_fsync = os.fsync
    calls = {"n": 0}

    def fills_up(descriptor):
        calls["n"] += 1
        # config.json, the dense models (2 x checkpoint and record), round 1 (6 x 2), then
        # round 2's: three runs of seed 0, and the checkpoint of seed 1's first.
        if calls["n"] == 1 + 4 + 12 + 6 + 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(descriptor)

    monkeypatch.setattr(study_files.os, "fsync", fills_up)
    assert main(["-q", "study", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    checkpoint = out / "checkpoints" / "seed1-control-r02.pt"
    assert err.startswith(f"recallprune study: error: cannot write {checkpoint}: no space left")
    assert f"--resume {out}" in err
    # Every record before the failure, none after it (a record follows its checkpoint).
    records = {p.name for p in (out / "runs").glob("*-r02.json")}
    assert records == {f"seed0-{arm}-r02.json" for arm in ("control", "magnitude", "random")}
    assert len(list((out / "runs").iterdir())) == 2 + 6 + 3
    assert not any(p.name.endswith(".tmp") for p in out.rglob("*"))
    monkeypatch.setattr(study_files.os, "fsync", real_fsync)
    assert main(["-q", "study", *args, "--out", str(out)]) == 0

    def runs(folder):
        results = json.loads((folder / "results.json").read_text())
        return [{k: v for k, v in r.items() if k != "seconds"} for r in results["runs"]]

    # The runs saved before the failure are reused as they are; the others are computed in
    # smaller stacks than in one go (batched products may round differently), with the
    # same exact pruning.
    before = {(0, "dense", 0), (1, "dense", 0)} | {
        (seed, arm, 1) for seed in (0, 1) for arm in ("control", "magnitude", "random")
    }
    before |= {(0, arm, 2) for arm in ("control", "magnitude", "random")}
    resumed, whole = runs(out), runs(complete)
    assert len(resumed) == len(whole) == 2 + 2 * 3 * 3
    for x, y in zip(resumed, whole, strict=True):
        key = (x["seed"], x["criterion"], x["round"])
        assert key == (y["seed"], y["criterion"], y["round"])
        assert x == y if key in before else x["sparsity"] == y["sparsity"], key


def test_new_files_get_the_permissions_of_open(tmp_path):
    umask = os.umask(0o022)
    try:
        study_files.atomic_write_text(tmp_path / "a.txt", "x")
        study_files.atomic_save({"x": 1}, tmp_path / "b.pt")
    finally:
        os.umask(umask)
    for name in ("a.txt", "b.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644


# -- OS errors -------------------------------------------------------------------------------


def test_disk_full(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"

    def no_space(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(study_files.os, "fsync", no_space)
    assert main(["-q", "study", *MINI, "--out", str(out)]) == 2
    line = _error_line(capsys)
    assert line == (
        f"recallprune study: error: cannot write {out / 'config.json'}: no space left on the device"
    )
    assert list(out.iterdir()) == []  # no temporary file left behind


def test_read_only_folder(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    real_open = os.open

    def read_only(path, *args, **kwargs):  # root ignores chmod, so the refusal is simulated
        if Path(path).parent == out:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(study_files.os, "open", read_only)
    assert main(["-q", "study", *MINI, "--out", str(out)]) == 2
    line = _error_line(capsys)
    assert f"cannot write {out / 'config.json'}: permission denied" in line
    assert "read-only" in line
    assert list(out.iterdir()) == []


def test_a_file_where_a_folder_is_expected(tmp_path, capsys, failed_start):
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    assert main(["-q", "study", *MINI, "--out", str(blocker / "study")]) == 2
    assert _error_line(capsys) == (
        f"recallprune study: error: cannot create the output folder {blocker / 'study'}: "
        f"{blocker} is a file where a folder is expected"
    )
    assert main(["-q", "study", *MINI, "--out", str(blocker)]) == 2
    assert f"--out {blocker} exists and is not a folder" in _error_line(capsys)
    # Inside a study's folder, mid-study: the error names the file, the note the resume.
    (failed_start / "checkpoints").write_text("not a folder")
    assert main(["-q", "study", *MINI, "--out", str(failed_start)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == (
        f"recallprune study: error: cannot write {failed_start / 'checkpoints'}"
        f"/seed0-dense-r00.pt: {failed_start / 'checkpoints'} is a file where a folder is "
        "expected"
    )
    assert f"--resume {failed_start}" in err


# -- unreadable and foreign files ------------------------------------------------------------


def test_unreadable_run_record_and_checkpoint(failed_start, finished, capsys):
    runs = failed_start / "runs"
    runs.mkdir()
    record = runs / "seed0-dense-r00.json"
    record.write_text('{"seed": 0, "crit')
    assert main(["-q", "study", *MINI, "--out", str(failed_start)]) == 2
    line = _error_line(capsys)
    assert f"run record {record} cannot be read" in line and "corrupt or truncated" in line
    shutil.copy(finished / "runs" / record.name, record)
    checkpoint = failed_start / "checkpoints" / "seed0-dense-r00.pt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"PK\x03\x04 not a checkpoint")
    assert main(["-q", "study", *MINI, "--out", str(failed_start)]) == 2
    line = _error_line(capsys)
    assert f"checkpoint {checkpoint} cannot be read" in line and "delete it" in line


def test_unreadable_results_file(finished, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    (copy / "results.json").write_bytes(b'{"config": "\xff\xfe"}')
    for command in (["report", str(copy)], ["study", *MINI, "--out", str(copy)]):
        assert main(["-q", *command]) == 2
        line = _error_line(capsys)
        assert f"results file {copy / 'results.json'} cannot be read" in line


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ([1, 2], "it holds a JSON list, not an object"),
        ({"runs": []}, "no 'config' entry"),
        ({"config": {}, "runs": []}, "'config' lacks dataset"),
        ("config", "it holds a JSON str"),
    ],
)
def test_results_of_the_wrong_schema_are_refused_and_kept(
    finished, tmp_path, capsys, content, problem
):
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    text = json.dumps(content)
    (copy / "results.json").write_text(text)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    for command in (["report", str(copy)], ["study", *MINI, "--out", str(copy)]):
        assert main(["-q", *command]) == 2
        line = _error_line(capsys)
        assert f"{copy / 'results.json'} is not a recallprune results file ({problem}" in line
        assert "nothing was overwritten" in line
    assert before == {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}


def test_results_of_another_study_are_refused(finished, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    results = json.loads((copy / "results.json").read_text())
    results["config"]["lr"] = 0.5
    (copy / "results.json").write_text(json.dumps(results))
    assert main(["-q", "study", *MINI, "--out", str(copy)]) == 2
    assert "holds the results of another study (its config differs in lr)" in _error_line(capsys)


# -- resume ----------------------------------------------------------------------------------


def test_interrupt_prints_the_command_that_resumes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out, runs/<dataset>-<model>-<time>, lands here
    evaluate = interrupt_evaluation(monkeypatch, at=2)
    assert main(["-q", "study", *MINI]) == 130
    err = capsys.readouterr().err
    (out,) = (tmp_path / "runs").iterdir()
    assert out.name.startswith("digits-mlp-")
    assert "interrupted: 1 runs computed" in err
    command = err.strip().splitlines()[-1].strip()
    assert command.endswith(f"study --resume {shlex.quote(str(Path('runs') / out.name))}")
    monkeypatch.setattr(runner, "evaluate", evaluate)
    argv = shlex.split(command)
    assert argv[argv.index("study") - 1] in ("recallprune", "-m")
    assert main(["-q", *argv[argv.index("study") :]]) == 0
    assert "(2 runs computed, 1 reused)" in capsys.readouterr().out
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 3
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [out.name]  # no second folder


def test_interrupt_before_the_study_started(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "load_dataset", interrupted)
    assert main(["-q", "study", *MINI, "--out", str(tmp_path / "out")]) == 130
    assert "interrupted: nothing was written" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_resume_takes_the_settings_of_the_folder(failed_start, tmp_path):
    parser = build_parser()
    saved = json.loads((failed_start / "config.json").read_text())
    config = _resumed_config(parser.parse_args(["study", "--resume", str(failed_start)]))
    assert config.identity() == {k: v for k, v in saved.items() if k in config.identity()}
    assert config.out == str(failed_start)
    # Flags may repeat the study's settings, or change what does not change its results.
    args = ["study", "--resume", str(failed_start), "--seeds", "0", "--data-root", "elsewhere"]
    assert _resumed_config(parser.parse_args(args)).data_root == "elsewhere"
    refusals = {
        ("--lr", "0.5"): "--lr 0.5 would change them (the study has 0.05)",
        ("--config", "x.toml"): "drop --config",
        ("--out", str(tmp_path / "other")): "name different folders",
    }
    for flags, message in refusals.items():
        with pytest.raises(StudyError, match=re.escape(message)):
            _resumed_config(parser.parse_args(["study", "--resume", str(failed_start), *flags]))
    with pytest.raises(StudyError, match="no study there"):
        _resumed_config(parser.parse_args(["study", "--resume", str(tmp_path)]))
