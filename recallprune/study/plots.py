"""The study's plots, one function per figure. Sparsity is shown as the lottery-ticket papers
show it: weights remaining, on a log scale, falling from left to right, so that the rounds of
an iterative schedule are evenly spaced. Each criterion gets its own panel, beside the
control arm (and its mitigated arms, if any), so that no two confidence bands of criteria
overlap."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .. import distortion as D
from .._extras import study_imports
from . import tables
from .files import atomic_write
from .records import CONTROL

PLOTS = ("intensification.png", "recall_gaps.png", "accuracy.png")
MITIGATION_PLOTS = ("multipliers.png",)  # only where the study has mitigated arms
STYLES = ("-", "-.", ":")  # an unmitigated arm, then its mitigated arms
CONTROL_COLOR = "0.45"
MAX_TICKS = 7
DPI = 120


def _pyplot():
    with study_imports("the plots"):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    return plt


def plot_names(results: dict[str, Any]) -> list[str]:
    """The plots a study's results make."""
    return [*PLOTS, *(MITIGATION_PLOTS if tables.mitigated_arms(results) else ())]


def _colors(results: dict[str, Any]) -> dict[str, Any]:
    """One colour per arm, the same in every figure; the control grey."""
    plt = _pyplot()
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    arms = tables.arms(results)[:-1]
    return {**{c: cycle[i % len(cycle)] for i, c in enumerate(arms)}, CONTROL: CONTROL_COLOR}


def _grid(count: int, max_columns: int, panel: tuple[float, float], **kwargs):
    """A figure of ``count`` panels in rows of at most ``max_columns``; spare panels hidden
    (they are returned, for a legend)."""
    plt = _pyplot()
    columns = min(count, max_columns)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(
        rows,
        columns,
        figsize=(panel[0] * columns, panel[1] * rows + 0.6),
        squeeze=False,
        layout="constrained",
        **kwargs,
    )
    axes = list(axes.flat)
    for ax in axes[count:]:
        ax.set_axis_off()
    return fig, axes[:count], axes[count:]


def _columns(panels: int) -> int:
    """Two columns for two or four panels, else up to three."""
    return 2 if panels in (2, 4) else min(panels, 3)


def _label_axes(axes: list, xlabel: str, ylabel: str) -> None:
    """Axis labels on the outer panels: x under each panel with none below it (its tick
    labels shown again where a shared axis hid them), y on the first column."""
    columns = axes[0].get_gridspec().ncols
    for index, ax in enumerate(axes):
        if index + columns >= len(axes):
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel(xlabel)
        if index % columns == 0:
            ax.set_ylabel(ylabel)


def _percent(fraction: float) -> str:
    value = 100 * fraction
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"


def weights_remaining_axis(ax, sparsities: list[float]) -> None:
    """x: weights remaining (1 - sparsity) in percent, log scale, 100% on the left; ticks
    at the study's levels, thinned to at most MAX_TICKS."""
    from matplotlib.ticker import FixedLocator, NullLocator

    remaining = sorted({1.0 - s for s in sparsities}, reverse=True)
    step = max(1, math.ceil(len(remaining) / MAX_TICKS))
    ticks = remaining[::step]
    if remaining[-1] not in ticks:
        ticks.append(remaining[-1])
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([_percent(t) for t in ticks])
    margin = 1.15
    ax.set_xlim(remaining[0] * margin, remaining[-1] / margin)  # falling: 100% first
    ax.grid(True, which="major", alpha=0.3)


def _band(ax, xs, mean, low, high, color, label, style="-") -> None:
    ax.plot(xs, mean, style, color=color, marker="o", markersize=3, label=label)
    ax.fill_between(xs, low, high, color=color, alpha=0.18, linewidth=0)


def _ratio_series(summaries, arm: str, sparsities: list[float]):
    rows = [summaries[(arm, s)] for s in sparsities if (arm, s) in summaries]
    xs = [1.0 - r["sparsity"] for r in rows]
    return xs, *([tables.as_float(r[key]) for r in rows] for key in ("mean", "ci_low", "ci_high"))


def intensification_figure(results: dict[str, Any]):
    """The model-level ratio against weights remaining: a panel per criterion, with the
    control arm in each, mean and 95% interval over seeds."""
    config = results["config"]
    summaries = tables.summaries(results)
    sparsities = tables.sparsities(results)
    colors = _colors(results)
    groups = tables.arm_groups(results)
    fig, axes, _ = _grid(len(groups), _columns(len(groups)), (4.6, 3.2), sharex=True, sharey=True)
    control = _ratio_series(summaries, CONTROL, sparsities)
    for ax, (criterion, arms) in zip(axes, groups.items(), strict=True):
        if control[0]:
            _band(ax, *control, CONTROL_COLOR, "control (nothing pruned)", "--")
        for arm, style in zip(arms, STYLES * len(arms), strict=False):
            _band(ax, *_ratio_series(summaries, arm, sparsities), colors[arm], arm, style)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
        weights_remaining_axis(ax, sparsities)
        ax.set_title(criterion)
        ax.legend(fontsize=8, loc="best")
    _label_axes(axes, "weights remaining (%, log scale)", "intensification ratio")
    n_seeds = len(config["seeds"])
    fig.suptitle(
        f"{config['dataset']} / {config['model']}: intensification ratio as weights are "
        f"pruned\n(mean and 95% interval over {n_seeds} seeds; > 1: the gaps between classes "
        "grow)",
        fontsize=10,
    )
    return fig


def accuracy_figure(results: dict[str, Any]):
    """Test accuracy against weights remaining: a panel per criterion, with the control
    arm and the dense models' mean in each."""
    config = results["config"]
    sparsities = tables.sparsities(results)
    colors = _colors(results)
    groups = tables.arm_groups(results)
    dense_mean, _ = tables.mean_half(tables.accuracies(results, CONTROL, 0.0))

    def series(arm):
        xs, means, lows, highs = [], [], [], []
        for s in sparsities:
            values = tables.accuracies(results, arm, s)
            if not values:
                continue
            mean, half = tables.mean_half(values)
            half = 0.0 if math.isnan(half) else half
            xs.append(1.0 - s)
            means.append(mean)
            lows.append(max(0.0, mean - half))  # an accuracy lies in [0, 1]
            highs.append(min(1.0, mean + half))
        return xs, means, lows, highs

    fig, axes, _ = _grid(len(groups), _columns(len(groups)), (4.6, 3.2), sharex=True, sharey=True)
    control = series(CONTROL)
    for ax, (criterion, arms) in zip(axes, groups.items(), strict=True):
        _band(ax, *control, CONTROL_COLOR, "control (nothing pruned)", "--")
        for arm, style in zip(arms, STYLES * len(arms), strict=False):
            _band(ax, *series(arm), colors[arm], arm, style)
        ax.axhline(dense_mean, color="black", linewidth=0.8, linestyle=":", label="dense mean")
        weights_remaining_axis(ax, sparsities)
        ax.set_title(criterion)
        ax.legend(fontsize=8, loc="lower left")
    _label_axes(axes, "weights remaining (%, log scale)", "test accuracy")
    fig.suptitle(
        f"{config['dataset']} / {config['model']}: test accuracy as weights are pruned\n"
        f"(mean and 95% interval over {len(config['seeds'])} seeds)",
        fontsize=10,
    )
    return fig


def recall_gap_figure(results: dict[str, Any]):
    """Per class and seed, the pruned model's recall gap against the dense model's at the
    last round, a panel per arm; the line of slope = the mean ratio is what the ratio
    measures (above the diagonal on the right: gaps grew)."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    config, runs = results["config"], results["runs"]
    summaries = tables.summaries(results)
    arms = tables.arms(results)
    dense = {r["seed"]: r for r in tables.dense_runs(results)}
    top_round = max((r["round"] for r in runs), default=0)
    top = next((r["nominal_sparsity"] for r in runs if r["round"] == top_round), 0.0)
    seeds = sorted(dense)
    seed_colors = plt.get_cmap("tab10" if len(seeds) <= 10 else "viridis")
    color_of = {
        seed: seed_colors(i if len(seeds) <= 10 else i / max(1, len(seeds) - 1))
        for i, seed in enumerate(seeds)
    }

    def gaps(record):
        recall = [tables.as_float(v) for v in record["recall"]]
        return D.recall_gaps(recall, tables.as_float(record["accuracy"]))

    # Not shared: every panel keeps its tick labels; the limits are made equal below.
    fig, axes, spare = _grid(len(arms), 3, (3.4, 3.3))
    extent = 0.0
    for ax, arm in zip(axes, arms, strict=True):
        for r in runs:
            if r["criterion"] != arm or r["round"] != top_round or r["seed"] not in dense:
                continue
            x, y = gaps(dense[r["seed"]]), gaps(r)
            ax.scatter(x, y, s=12, alpha=0.75, color=color_of[r["seed"]], linewidths=0)
            finite = np.isfinite(x) & np.isfinite(y)
            extent = max(extent, float(np.max(np.abs(np.r_[x[finite], y[finite], 0.0]))))
        summary = summaries.get((arm, tables.level(top)))
        ratio = tables.as_float(summary["mean"]) if summary else math.nan
        ax.set_title(f"{arm} (ratio {ratio:.2f})" if math.isfinite(ratio) else arm, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(5, symmetric=True))
        ax.yaxis.set_major_locator(MaxNLocator(5, symmetric=True))
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
    limit = 1.1 * extent if extent > 0 else 1.0
    line = np.array([-limit, limit])
    for ax, arm in zip(axes, arms, strict=True):
        ax.plot(line, line, color="black", linewidth=0.8, linestyle=":")
        summary = summaries.get((arm, tables.level(top)))
        ratio = tables.as_float(summary["mean"]) if summary else math.nan
        if math.isfinite(ratio):
            ax.plot(line, ratio * line, color="tab:red", linewidth=1.0)
        ax.set_xlim(-limit, limit)
        ax.set_ylim(-limit, limit)
        ax.set_aspect("equal")
        ax.set_xlabel("dense gap")  # every panel: the axes are not shared
    _label_axes(axes, "dense gap", "pruned gap")
    handles = [
        Line2D([], [], color="black", linewidth=0.8, linestyle=":", label="no change"),
        Line2D([], [], color="tab:red", linewidth=1.0, label="slope = mean ratio"),
    ]
    handles += [
        Line2D([], [], marker="o", linestyle="", color=color_of[s], label=f"seed {s}")
        for s in seeds
    ]
    host = spare[0] if spare else axes[-1]
    host.legend(handles=handles, loc="center" if spare else "best", fontsize=8)
    fig.suptitle(
        f"{config['dataset']} / {config['model']}: recall gap (recall - accuracy) per class,\n"
        f"pruned at {_percent(1.0 - top)}% of weights remaining (round {top_round}) against "
        "dense",
        fontsize=10,
    )
    return fig


def multiplier_figure(results: dict[str, Any]):
    """The multipliers of each mitigated arm through every fine-tuning epoch of every round:
    per epoch, the largest and the mean over classes, each averaged over seeds, with the
    rounds' boundaries marked. A multiplier that stays 0 never met an active constraint."""
    config = results["config"]
    colors = _colors(results)
    arms = tables.mitigated_arms(results)
    fig, axes, _ = _grid(len(arms), _columns(len(arms)), (4.6, 3.0), sharex=True, sharey=True)
    epochs_per_round = int(config.get("finetune_epochs", 1))
    for ax, arm in zip(axes, arms, strict=True):
        trajectories = list(tables.multiplier_trajectories(results, arm).values())
        if trajectories:
            length = min(len(t) for t in trajectories)
            stacked = np.stack([t[:length] for t in trajectories])  # [seeds, epochs, C]
            xs = np.arange(1, length + 1)
            ax.plot(xs, stacked.max(axis=2).mean(axis=0), color=colors[arm], label="largest")
            ax.plot(xs, stacked.mean(axis=2).mean(axis=0), "--", color=colors[arm], label="mean")
            for boundary in range(epochs_per_round, length, epochs_per_round):
                ax.axvline(boundary + 0.5, color="0.85", linewidth=0.6, zorder=0)
        ax.set_title(arm)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    _label_axes(axes, "fine-tuning epoch (rounds marked)", "multiplier")
    fig.suptitle(
        f"{config['dataset']} / {config['model']}: the per-class multipliers through "
        f"fine-tuning\n(largest and mean over classes, mean over {len(config['seeds'])} seeds)",
        fontsize=10,
    )
    return fig


FIGURES = {
    "intensification.png": intensification_figure,
    "recall_gaps.png": recall_gap_figure,
    "accuracy.png": accuracy_figure,
    "multipliers.png": multiplier_figure,
}


def write_plots(results: dict[str, Any], out: Path) -> None:
    plt = _pyplot()
    for name in plot_names(results):
        fig = FIGURES[name](results)
        try:
            atomic_write(
                Path(out) / name, lambda handle, fig=fig: fig.savefig(handle, format="png", dpi=DPI)
            )
        finally:
            plt.close(fig)
