"""Bad input to the study: every setting type-checked, config files read strictly, and all
that can be checked before training checked before the output folder is created; a start
that fails later does not block the corrected rerun."""

import json

import pytest
import torch

from recallprune.study import StudyConfig, StudyError, grid, runner
from recallprune.study.cli import main
from recallprune.study.config import check_setting, read_config_file

from .studies import MINI


def _refused(capsys, argv, *messages):
    """``argv`` exits with status 2 and one line of error holding every message."""
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for message in messages:
        assert message in err, err
    return err


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("seeds", "12", "seeds must be a list of integers, e.g. [12], got '12' (a string)"),
        ("seeds", [1, True], "seeds[1] must be an integer, got True (a bool)"),
        ("criteria", "magnitude", "criteria must be a list of strings"),
        ("exclude", "fc3", "exclude must be a list of strings"),
        ("rounds", True, "rounds must be an integer, got True (a bool)"),
        ("epochs", 1.5, "epochs must be an integer, got 1.5 (a float)"),
        ("lr", "0.1", "lr must be a number, got '0.1' (a string)"),
        ("lr", float("nan"), "lr must be a finite number"),
        ("momentum", False, "momentum must be a number, got False (a bool)"),
        ("dataset", 3, "dataset must be a string, got 3 (a int)"),
        ("download", "yes", "download must be true or false"),
    ],
)
def test_settings_are_type_checked(setting, value, message):
    with pytest.raises(ValueError) as error:
        check_setting(setting, value)
    assert message in str(error.value)
    with pytest.raises(ValueError, match="must be"):
        StudyConfig.from_dict({setting: value})
    config = StudyConfig()
    setattr(config, setting, value)
    with pytest.raises(ValueError, match="must be"):
        config.validate()


def test_settings_of_the_right_type_are_kept_and_numbers_made_floats():
    config = StudyConfig.from_dict({"lr": 1, "seeds": (3, 4), "exclude": None})
    assert config.lr == 1.0 and isinstance(config.lr, float)
    assert config.seeds == [3, 4] and config.exclude is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[study]\nseeds = "12"\n', "seeds must be a list of integers"),
        ("[study]\nrounds = true\n", "rounds must be an integer, got True"),
        ("[study]\nepochs = 1.5\n", "epochs must be an integer, got 1.5"),
        ('[study]\nlr = "0.1"\n', "lr must be a number, got '0.1'"),
        (
            "[study]\nseeds = [0]\n[training]\nlr = 0.5\n",
            "only the [study] table is read, and it holds 'training' besides it",
        ),
        ("lr = 0.5\n[training]\nepochs = 2\n", "unknown setting 'training'"),
        ("[study]\nlearning_rate = 0.5\n", "unknown setting 'learning_rate'"),
        ("[study]\nfinetune-epoch = 2\n", "(did you mean 'finetune_epochs'?)"),
        ("[study.extra]\nx = 1\n", "unknown setting 'extra'"),
        ("[study\nseeds = [0]\n", "is not valid TOML"),
    ],
)
def test_config_file_errors_name_the_file_and_write_nothing(tmp_path, capsys, text, message):
    path = tmp_path / "study.toml"
    path.write_text(text)
    out = tmp_path / "out"
    _refused(capsys, ["study", "--config", str(path), "--out", str(out)], str(path), message)
    assert not out.exists()


def test_config_files_in_json_and_yaml(tmp_path, capsys):
    path = tmp_path / "study.json"
    path.write_text('{"study": {"seeds": [1, 2], "finetune-lr": 0.02}}')
    assert read_config_file(path) == {"seeds": [1, 2], "finetune_lr": 0.02}
    path.write_text('{"seeds": "12"}')
    with pytest.raises(StudyError, match=f"config file {path}: seeds must be a list"):
        read_config_file(path)
    path.write_text('{"seeds": [1,')
    with pytest.raises(StudyError, match=f"config file {path} is not valid JSON"):
        read_config_file(path)
    path.write_bytes(b'{"seeds": [1]}\xff')
    with pytest.raises(StudyError, match=f"config file {path} is not UTF-8 text"):
        read_config_file(path)
    with pytest.raises(StudyError, match="config file .*missing.toml does not exist"):
        read_config_file(tmp_path / "missing.toml")
    folder = tmp_path / "folder.toml"
    folder.mkdir()
    with pytest.raises(StudyError, match=f"config file {folder} cannot be read: is a directory"):
        read_config_file(folder)
    pytest.importorskip("yaml")
    path = tmp_path / "study.yaml"
    path.write_text("study:\n  seeds: 12\n")
    with pytest.raises(StudyError, match=f"config file {path}: seeds must be a list"):
        read_config_file(path)
    path.write_text("study: [unclosed\n")
    with pytest.raises(StudyError, match=f"config file {path} is not valid YAML"):
        read_config_file(path)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--exclude", "fc9"], "exclude: no module of the model is named or matches 'fc9'"),
        (["--device", "gpu"], "device 'gpu' is not a device name"),
        (["--lr", "-1"], "optimizer settings (lr -1.0, momentum 0.9"),
        (["--finetune-lr", "-0.5"], "Invalid learning rate: -0.5"),
        (["--momentum", "-0.5"], "Invalid momentum value: -0.5"),
        (["--weight-decay", "-1"], "Invalid weight_decay value: -1.0"),
        (["--dataset", "synthetic", "--model", "cnn"], "model 'cnn' needs image inputs"),
        (["--model", "resnet9000"], "unknown model 'resnet9000'"),
        (["--retrain", "rewind", "--rewind-epoch", "5"], "rewind_epoch must lie in [0, epochs]"),
        (["--fraction", "1.5"], "fraction must lie in (0, 1)"),
        (["--dataset", "mnist", "--data-root", "{tmp}/none"], "train-images-idx3-ubyte"),
    ],
)
def test_checked_before_the_output_folder_is_created(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    _refused(capsys, ["study", *MINI, *flags, "--out", str(out)], message)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_refused_where_there_is_none(tmp_path, capsys):
    out = tmp_path / "out"
    _refused(capsys, ["study", *MINI, "--device", "cuda", "--out", str(out)], "CUDA is not")
    assert not out.exists()


def test_a_failed_start_does_not_block_the_corrected_rerun(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("simulated: out of memory")

    monkeypatch.setattr(runner, "train", out_of_memory)  # one model at a time
    monkeypatch.setattr(grid, "train_stacked", out_of_memory)  # the batched grid
    assert main(["-q", "study", *MINI, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "simulated: out of memory" in err
    assert (out / "config.json").exists() and not (out / "runs").exists()
    monkeypatch.undo()
    # The corrected rerun differs in a setting: the folder held no finished run, so it is
    # taken over rather than refused as another study.
    assert main(["-q", "study", *MINI, "--batch-size", "128", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["batch_size"] == 128
    assert json.loads((out / "results.json").read_text())["config"]["batch_size"] == 128
    # Once it holds finished runs, a study with other settings is refused.
    _refused(capsys, ["study", *MINI, "--out", str(out)], "holds another study")
