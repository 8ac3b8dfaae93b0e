"""The study's plots as a reader needs them: weights remaining on a log scale falling from
left to right, a panel per criterion beside the control (no two criteria's bands on one
panel), a legend and few, readable ticks on the recall-gap plot, a title on every figure."""

import matplotlib
import numpy as np
import pytest
import torch

from recallprune.study import plots
from recallprune.study.records import make_record
from recallprune.study.report import build_results

matplotlib.use("Agg")
ROUNDS = 18
CRITERIA = ["magnitude", "undecayed", "random"]


@pytest.fixture(scope="module")
def results():
    """A study's results with the default ladder (18 rounds), from made-up matrices."""
    rng = np.random.default_rng(0)

    def confusion(error_rate):
        """45 test samples per class; classes err at different rates."""
        counts = np.zeros((10, 10), dtype=np.int64)
        for c in range(10):
            wrong = rng.binomial(45, min(0.9, error_rate * (0.5 + c / 9)))
            counts[c, c] = 45 - wrong
            others = [k for k in range(10) if k != c]
            counts[c, others] = rng.multinomial(wrong, np.full(9, 1 / 9))
        return torch.as_tensor(counts)

    config = {
        "dataset": "digits",
        "model": "mlp",
        "seeds": [0, 1, 2],
        "criteria": CRITERIA,
        "fraction": 0.2,
        "rounds": ROUNDS,
        "retrain": "finetune",
        "scope": "global",
        "epochs": 40,
        "finetune_epochs": 4,
        "batch_size": 64,
        "lr": 0.05,
        "finetune_lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "device": "cpu",
        "level": 0.05,
    }
    runs = []
    for seed in config["seeds"]:
        runs.append(make_record(confusion(0.05), seed, "dense", 0, 0.0, 0.0, 0.1, 1.0))
        for arm in [*CRITERIA, "control"]:
            for r in range(1, ROUNDS + 1):
                nominal = 1 - 0.8**r
                sparsity = 0.0 if arm == "control" else nominal
                runs.append(
                    make_record(confusion(0.05 + r / 60), seed, arm, r, nominal, sparsity, 0.1, 1.0)
                )
    return build_results(config, runs)


def _visible(fig):
    return [ax for ax in fig.axes if ax.axison]


@pytest.mark.parametrize("figure", [plots.intensification_figure, plots.accuracy_figure])
def test_sparsity_as_weights_remaining_on_a_log_scale(results, figure):
    fig = figure(results)
    axes = _visible(fig)
    assert len(axes) == len(CRITERIA)  # small multiples: one panel per criterion
    for ax, criterion in zip(axes, CRITERIA, strict=True):
        assert ax.get_title() == criterion
        assert ax.get_xscale() == "log"
        left, right = ax.get_xlim()
        assert left > 1.0 and right < 0.8**ROUNDS  # 100% on the left, the sparsest right
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        assert ticks[0] == "100" and ticks[-1] == "1.8" and len(ticks) <= plots.MAX_TICKS + 1
        assert ax.xaxis.get_tick_params()["labelbottom"]  # shown under every panel
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert criterion in labels and "control (nothing pruned)" in labels
        assert not any(c in labels for c in CRITERIA if c != criterion)  # one band per criterion
        assert len(ax.collections) == 2  # its band and the control's
    assert any("weights remaining" in ax.get_xlabel() for ax in axes)
    assert "digits / mlp" in fig._suptitle.get_text()
    matplotlib.pyplot.close(fig)


def test_recall_gap_plot_has_a_legend_titles_and_readable_ticks(results):
    fig = plots.recall_gap_figure(results)
    axes = _visible(fig)
    assert [ax.get_title().split(" (")[0] for ax in axes] == [*CRITERIA, "control"]
    assert "98.2%" not in fig._suptitle.get_text()
    assert "1.8% of weights remaining (round 18)" in fig._suptitle.get_text()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 1
    labels = [t.get_text() for t in legends[0].get_texts()]
    assert labels == ["no change", "slope = mean ratio", "seed 0", "seed 1", "seed 2"]
    for ax in axes:
        assert ax.get_xlabel() or ax.get_subplotspec().rowspan.stop < 2
        assert len(ax.get_xticks()) <= 7 and len(ax.get_yticks()) <= 7
        assert ax.get_xlim() == ax.get_ylim()  # the diagonal is the diagonal
        for label in ax.get_xticklabels():
            assert label.get_fontsize() >= 8
    matplotlib.pyplot.close(fig)


def test_write_plots_writes_every_plot(results, tmp_path):
    plots.write_plots(results, tmp_path)
    for name in plots.PLOTS:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(plots.PLOTS)
