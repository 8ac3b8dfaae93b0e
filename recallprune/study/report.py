"""The study's outputs: ``results.json`` and ``results.csv`` (every run), ``report.md``
(tables and the answers to the paper's questions, with their numbers) and PNG plots.
``recallprune report DIR`` rebuilds all of them from ``results.json``."""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from .. import distortion as D
from .runner import CONTROL, DENSE, StudyError, atomic_write_text, read_json

PLOTS = ("intensification.png", "recall_gaps.png", "accuracy.png")
HIGH_SPARSITY = 0.8  # "high sparsity" in the answers: nominal sparsity at least this
LOW_SPARSITY = 0.5  # "low sparsity": at most this


def analysis_inputs(runs: list[dict[str, Any]]):
    """Dense confusion per seed and the pruned records (round 0 of every arm is the dense
    model itself, so its ratio is exactly 1 by definition)."""
    dense = {r["seed"]: np.asarray(r["confusion"]) for r in runs if r["criterion"] == DENSE}
    arms = sorted({r["criterion"] for r in runs if r["criterion"] != DENSE})
    pruned = [
        {"seed": seed, "criterion": arm, "sparsity": 0.0, "confusion": confusion}
        for seed, confusion in dense.items()
        for arm in arms
    ]
    pruned += [
        {
            "seed": r["seed"],
            "criterion": r["criterion"],
            "sparsity": r["nominal_sparsity"],
            "confusion": np.asarray(r["confusion"]),
        }
        for r in runs
        if r["criterion"] != DENSE
    ]
    return dense, pruned


def build_results(config: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    dense, pruned = analysis_inputs(runs)
    analysis = D.analyze(dense, pruned, level=config.get("level", 0.05))
    return {"config": config, "runs": runs, "analysis": analysis.to_dict()}


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _p(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.2g}" if x >= 1e-3 else f"{x:.1e}"


def _nanmean(values: list[Any]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _percent(x: Any) -> float | None:
    return None if x is None else 100 * x


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _mean_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * stats.sem(values))
    return mean, half


def _level(sparsity: float) -> float:
    """A sparsity as a table key (the analysis and the runs round it alike)."""
    return round(sparsity, 6)


def _summaries(results) -> dict[tuple[str, float], dict[str, Any]]:
    return {(s["criterion"], _level(s["sparsity"])): s for s in results["analysis"]["summaries"]}


def answers(results: dict[str, Any]) -> list[str]:
    """The paper's three questions, answered from this run's numbers."""
    level = results["analysis"]["level"]
    summaries = _summaries(results)
    criteria = [c for c in results["config"]["criteria"]]
    sparsities = sorted({s for _, s in summaries if s > 0})
    out = []

    # 1. Does intensification grow with sparsity?
    lines = []
    for criterion in [*criteria, CONTROL]:
        xs, ys = [], []
        for s in sparsities:
            summary = summaries.get((criterion, s))
            for ratio in (summary or {}).get("ratios", []):
                if ratio is not None:
                    xs.append(s)
                    ys.append(ratio)
        if len(set(xs)) < 3:
            continue
        rho, p = stats.spearmanr(xs, ys)
        low, high = summaries[(criterion, sparsities[0])], summaries[(criterion, sparsities[-1])]
        trend = (
            "grows"
            if rho > 0 and p < level
            else ("shrinks" if rho < 0 and p < level else "no clear trend")
        )
        lines.append(
            f"  - {criterion}: {trend} (Spearman rho {rho:.2f}, p {_p(p)}); mean ratio "
            f"{_fmt(low['mean'])} at sparsity {sparsities[0]:.3f}, {_fmt(high['mean'])} at "
            f"{sparsities[-1]:.3f}"
        )
    out.append(
        "1. **Does intensification grow with sparsity?** Rank correlation of the per-seed "
        "ratio with sparsity, per criterion (the control arm prunes nothing):\n" + "\n".join(lines)
    )

    # 2. Is it weaker with UP than with magnitude?
    if "undecayed" in criteria and "magnitude" in criteria:
        high = [s for s in sparsities if s >= HIGH_SPARSITY] or sparsities[-1:]
        diffs = []
        wins = 0
        for s in high:
            up, mp = summaries[("undecayed", s)], summaries[("magnitude", s)]
            wins += up["mean"] is not None and mp["mean"] is not None and up["mean"] < mp["mean"]
            for a, b in zip(mp["ratios"], up["ratios"], strict=False):
                if a is not None and b is not None:
                    diffs.append(a - b)
        mean_diff = float(np.mean(diffs)) if diffs else math.nan
        p = float(stats.ttest_1samp(diffs, 0.0).pvalue) if len(diffs) > 1 else math.nan
        verdict = (
            "yes"
            if mean_diff > 0 and p < level
            else "no"
            if mean_diff < 0 and p < level
            else "not shown"
        )
        out.append(
            f"2. **Is intensification weaker with UP than with magnitude pruning?** {verdict}: at "
            f"sparsity >= {high[0]:.3f} ({len(high)} levels), UP's mean ratio is below MP's at "
            f"{wins} of {len(high)} levels; the mean paired difference MP - UP over seeds and "
            f"levels is {_fmt(mean_diff)} (t-test p {_p(p)}, n = {len(diffs)})."
        )
    # 3. De-intensification at low sparsity?
    low = [s for s in sparsities if s <= LOW_SPARSITY]
    found = []
    for criterion in criteria:
        for s in low:
            summary = summaries[(criterion, s)]
            if summary["verdict"] == D.DE_INTENSIFICATION:
                found.append(
                    f"{criterion} at {s:.3f} (ratio {_fmt(summary['mean'])}, "
                    f"p {_p(summary['p_value'])})"
                )
    control_low = [summaries[(CONTROL, s)]["mean"] for s in low if (CONTROL, s) in summaries]
    lowest = ", ".join(
        f"{c} {_fmt(summaries[(c, low[0])]['mean'])}"
        for c in [*criteria, CONTROL]
        if low and (c, low[0]) in summaries
    )
    out.append(
        "3. **Is there de-intensification at low sparsity?** "
        + (("yes: " + "; ".join(found)) if found else f"no significant case at level {level}")
        + (f". Mean ratios at the lowest sparsity ({low[0]:.3f}): {lowest}" if low else "")
        + (
            f"; the control's ratio over these levels averages {_fmt(_nanmean(control_low))}"
            if control_low
            else ""
        )
        + "."
    )
    return out


def render_report(results: dict[str, Any], out: Path) -> str:
    config, runs = results["config"], results["runs"]
    analysis = results["analysis"]
    level = analysis["level"]
    summaries = _summaries(results)
    arms = [*config["criteria"], CONTROL]
    sparsities = sorted({s for _, s in summaries})
    by_key = defaultdict(list)
    for r in runs:
        by_key[(r["criterion"], r["round"])].append(r)
    dense_runs = by_key[(DENSE, 0)]
    dense_acc, dense_half = _mean_ci([r["accuracy"] for r in dense_runs])
    num_classes = len(dense_runs[0]["recall"]) if dense_runs else 0

    text = io.StringIO()
    w = text.write
    w(f"# Recall-distortion study: {config['dataset']} / {config['model']}\n\n")
    w(
        f"Seeds {config['seeds']}; criteria {', '.join(config['criteria'])} and a control arm "
        f"(the same retraining, nothing pruned); {config['rounds']} rounds of pruning "
        f"{config['fraction']:.0%} of the remaining weights ({config['scope']} scope, retrain: "
        f"{config['retrain']}). Training: UndecayedSGD, lr {config['lr']}, momentum "
        f"{config['momentum']}, weight decay {config['weight_decay']}, "
        f"batch {config['batch_size']}, "
        f"{config['epochs']} epochs (cosine schedule) for the dense model; "
        f"{config['finetune_epochs']} epochs at lr "
        f"{config['lr'] if config['retrain'] == 'rewind' else config['finetune_lr']} "
        "after each round. "
        f"Device: {config['device']}.\n\n"
    )
    w(
        f"Dense test accuracy: {_fmt(dense_acc, 4)} ± {_fmt(dense_half, 4)} (95% interval over "
        f"{len(dense_runs)} seeds).\n\n"
    )
    w(
        "Definitions (this library's, following the paper's wording): gap d[c,t] = recall[c,t] - "
        "accuracy[t]; model-level intensification ratio alpha[t] = sum_c d[c,0] d[c,t] / "
        "sum_c d[c,0]^2 (> 1: intensification, < 1: de-intensification). Intervals are 95% "
        f"t-intervals over seeds; p: one-sample t-test of alpha = 1 (Wilcoxon beside it); "
        f"verdicts at level {level}. Retraining alone and measurement noise move the ratio too "
        "(regression to the mean pulls it below 1), so read each criterion beside the control.\n\n"
    )

    w("## Answers\n\n")
    w("\n".join(answers(results)) + "\n\n")

    w("## Accuracy\n\nMean test accuracy ± 95% interval over seeds, by nominal sparsity.\n\n")
    rows = []
    for s in sparsities:
        row = [f"{s:.3f}"]
        for arm in arms:
            summary = summaries.get((arm, s))
            rnd = [r for r in runs if r["criterion"] == arm and _level(r["nominal_sparsity"]) == s]
            accs = [r["accuracy"] for r in rnd] if s > 0 else [r["accuracy"] for r in dense_runs]
            mean, half = _mean_ci(accs)
            row.append(f"{_fmt(mean, 4)} ± {_fmt(half, 4)}" if summary else "n/a")
        rows.append(row)
    w(_table(["sparsity", *arms], rows) + "\n\n")

    w(
        "## Intensification ratio\n\nModel-level ratio per criterion and sparsity: mean [95% "
        "interval], p-value, Wilcoxon p, verdict, and the accuracy change from the dense model.\n\n"
    )
    rows = []
    for arm in arms:
        for s in sparsities:
            summary = summaries.get((arm, s))
            if summary is None:
                continue
            control = summaries.get((CONTROL, s))
            rows.append(
                [
                    arm,
                    f"{s:.3f}",
                    f"{_fmt(summary['mean'])} "
                    f"[{_fmt(summary['ci_low'])}, {_fmt(summary['ci_high'])}]",
                    _fmt(control["mean"]) if control else "n/a",
                    _p(summary["p_value"]),
                    _p(summary["wilcoxon_p_value"]),
                    summary["verdict"],
                    f"{_fmt(_percent(summary['accuracy_change']), 2)} pts",
                ]
            )
    w(
        _table(
            [
                "criterion",
                "sparsity",
                "ratio [95% CI]",
                "control ratio",
                "p",
                "Wilcoxon p",
                "verdict",
                "accuracy change",
            ],
            rows,
        )
        + "\n\n"
    )

    w(
        "## Per-class recall\n\nMean recall over seeds, dense and at the highest sparsity; n/a "
        "marks a class with no support in the test set (recall undefined).\n\n"
    )
    top = sparsities[-1] if sparsities else 0.0
    header = ["class", "dense"] + [f"{arm} @ {top:.3f}" for arm in arms]
    class_tests = {
        (t["criterion"], _level(t["sparsity"]), t["class_index"]): t
        for t in analysis["class_tests"]
    }
    rows = []
    for c in range(num_classes):
        dense_recall = [r["recall"][c] for r in dense_runs]
        row = [str(c), _fmt(_mean_ci(dense_recall)[0])]
        for arm in arms:
            test = class_tests.get((arm, _level(top), c))
            if test is None:
                row.append("n/a")
                continue
            mark = "*" if test["p_value"] is not None and test["p_value"] < level else ""
            row.append(f"{_fmt(test['pruned_recall_mean'])}{mark}")
        rows.append(row)
    w(_table(header, rows) + "\n\n")
    w(
        f"`*`: the class's gap changed significantly (Welch's t-test, dense against pruned, "
        f"level {level}).\n\n"
    )
    w("## Plots\n\n")
    for name, caption in zip(
        PLOTS,
        (
            "Intensification ratio against sparsity (95% bands)",
            "Pruned against dense recall gaps per class",
            "Accuracy against sparsity",
        ),
        strict=True,
    ):
        w(f"![{caption}]({name})\n\n")
    w(
        "Files: `results.json` and `results.csv` (every run's confusion matrix, recalls, accuracy, "
        "sparsity, criterion, seed and round), `config.json` (the resolved configuration).\n"
    )
    return text.getvalue()


def write_csv(results: dict[str, Any], path: Path) -> None:
    runs = results["runs"]
    num_classes = len(runs[0]["recall"]) if runs else 0
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        [
            "seed",
            "criterion",
            "round",
            "nominal_sparsity",
            "sparsity",
            "accuracy",
            *[f"recall_{c}" for c in range(num_classes)],
            "confusion",
        ]
    )
    for r in runs:
        writer.writerow(
            [
                r["seed"],
                r["criterion"],
                r["round"],
                r["nominal_sparsity"],
                r["sparsity"],
                r["accuracy"],
                *["" if v is None else v for v in r["recall"]],
                json.dumps(r["confusion"]),
            ]
        )
    atomic_write_text(path, buffer.getvalue())


def write_plots(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config, runs = results["config"], results["runs"]
    summaries = _summaries(results)
    arms = [*config["criteria"], CONTROL]
    sparsities = sorted({s for _, s in summaries})

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm in arms:
        rows = [summaries[(arm, s)] for s in sparsities if (arm, s) in summaries]
        xs = [r["sparsity"] for r in rows]
        mean = [np.nan if r["mean"] is None else r["mean"] for r in rows]
        low = [np.nan if r["ci_low"] is None else r["ci_low"] for r in rows]
        high = [np.nan if r["ci_high"] is None else r["ci_high"] for r in rows]
        style = "--" if arm == CONTROL else "-"
        (line,) = ax.plot(xs, mean, style, marker="o", markersize=3, label=arm)
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.15)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("sparsity (fraction of prunable weights removed)")
    ax.set_ylabel("intensification ratio")
    ax.set_title(f"{config['dataset']} / {config['model']}: intensification ratio")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / PLOTS[0], dpi=120)
    plt.close(fig)

    dense = {r["seed"]: r for r in runs if r["criterion"] == DENSE}
    top_round = max((r["round"] for r in runs), default=0)
    fig, axes = plt.subplots(1, len(arms), figsize=(3.2 * len(arms), 3.4), sharex=True, sharey=True)
    axes = np.atleast_1d(axes)
    for ax, arm in zip(axes, arms, strict=True):
        for r in runs:
            if r["criterion"] != arm or r["round"] != top_round:
                continue
            d = dense[r["seed"]]
            d_gap = [np.nan if v is None else v - d["accuracy"] for v in d["recall"]]
            p_gap = [np.nan if v is None else v - r["accuracy"] for v in r["recall"]]
            ax.scatter(d_gap, p_gap, s=10, alpha=0.7)
        limits = ax.get_xlim()
        ax.plot(limits, limits, color="grey", linewidth=0.8)
        ax.set_title(arm, fontsize=9)
        ax.set_xlabel("dense gap")
    axes[0].set_ylabel(f"pruned gap (round {top_round})")
    fig.tight_layout()
    fig.savefig(out / PLOTS[1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense_mean = np.mean([r["accuracy"] for r in dense.values()]) if dense else np.nan
    for arm in arms:
        xs, means, halves = [0.0], [dense_mean], [0.0]
        for s in sparsities[1:]:
            accs = [
                r["accuracy"]
                for r in runs
                if r["criterion"] == arm and _level(r["nominal_sparsity"]) == s
            ]
            mean, half = _mean_ci(accs)
            xs.append(s)
            means.append(mean)
            halves.append(0.0 if math.isnan(half) else half)
        style = "--" if arm == CONTROL else "-"
        (line,) = ax.plot(xs, means, style, marker="o", markersize=3, label=arm)
        ax.fill_between(
            xs,
            np.subtract(means, halves),
            np.add(means, halves),
            color=line.get_color(),
            alpha=0.15,
        )
    ax.set_xlabel("sparsity")
    ax.set_ylabel("test accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / PLOTS[2], dpi=120)
    plt.close(fig)


def write_outputs(config: dict[str, Any], runs: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """Write results.json, results.csv, report.md and the plots; returns the results."""
    results = build_results(config, runs)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    write_csv(results, out / "results.csv")
    write_plots(results, out)
    atomic_write_text(out / "report.md", render_report(results, out))
    return results


def rebuild(out: Path) -> dict[str, Any]:
    """``recallprune report DIR``: the report and plots again, from results.json."""
    out = Path(out)
    path = out / "results.json"
    if not path.exists():
        raise StudyError(f"{path} does not exist: is {out} a study's output folder?")
    results = read_json(path, "results file")
    if not isinstance(results, dict) or not {"config", "runs"} <= set(results):
        raise StudyError(f"{path} is not a recallprune results file (no 'config' and 'runs')")
    return write_outputs(results["config"], results["runs"], out)
