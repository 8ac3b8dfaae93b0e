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
from . import tables
from .files import StudyError, atomic_write_text, read_json
from .plots import plot_names, write_plots
from .records import CONTROL, DENSE, RUN_FIELDS, check_results

UP = "undecayed"  # the arm every other is compared with in the mitigations' table
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


def build_results(
    config: dict[str, Any],
    runs: list[dict[str, Any]],
    environment: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
) -> dict[str, Any]:
    dense, pruned = analysis_inputs(runs)
    analysis = D.analyze(dense, pruned, level=config.get("level", 0.05), control=CONTROL)
    return {
        "config": config,
        "environment": environment,
        "model": model,
        "runs": runs,
        "analysis": analysis.to_dict(),
    }


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


def _percent(x: Any) -> float | None:
    return None if x is None else 100 * x


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _per_seed(summary: dict[str, Any] | None) -> dict[Any, float]:
    if not summary:
        return {}
    return {
        seed: tables.as_float(r)
        for seed, r in zip(summary["seeds"], summary["ratios"], strict=True)
    }


def _versus_control(summaries, criterion: str, sparsity: float) -> dict[Any, float]:
    """Per seed: the criterion's ratio minus the control's at the same round (the ratio alone
    where the study has no control arm)."""
    ratios = _per_seed(summaries.get((criterion, sparsity)))
    control = _per_seed(summaries.get((CONTROL, sparsity)))
    if not control:
        return ratios
    return {seed: r - control[seed] for seed, r in ratios.items() if seed in control}


def _what_would_help(
    effect: float, values: list[float], noise_sd: float, level: float, what: str
) -> str:
    """For an inconclusive answer: what the seeds could detect, how many seeds the observed
    effect would need, and whether test-set noise or training variation dominates."""
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 2:
        return "Too few seeds to say what would help."
    sd = D.mean_statistics(finite)["sd"]
    detectable = D.min_detectable_effect(sd, len(finite), level)
    needed = D.seeds_needed(effect, sd, level)
    parts = [
        f"these {len(finite)} seeds could detect {what} of {_fmt(detectable)} (power 0.8, "
        f"level {level})",
        f"the observed {effect:+.3f} would need about {needed} seeds"
        if needed
        else "the observed difference is too small to detect with up to 1000 seeds",
    ]
    if math.isfinite(noise_sd) and sd > 0:
        share = min(1.0, noise_sd**2 / sd**2)
        parts.append(
            f"test-set resampling accounts for about {share:.0%} of the seeds' variance, so "
            + (
                "a larger test set would help more than more seeds"
                if share >= 0.5
                else "training variation dominates: more seeds would help, a larger test set little"
            )
        )
    return "What would help: " + "; ".join(parts) + "."


def _answer_trend(results, summaries, criteria, sparsities, level) -> str:
    """1. Per criterion and seed, the rank correlation of (ratio - control ratio) with
    sparsity; the seeds' correlations tested against 0 (seeds are the independent units, not
    the seed-level pairs), Benjamini-Hochberg over the criteria."""
    has_control = any(c == CONTROL for c, _ in summaries)
    rows = []
    for criterion in criteria:
        by_seed: dict[Any, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
        for s in sparsities:
            for seed, value in _versus_control(summaries, criterion, s).items():
                if math.isfinite(value):
                    by_seed[seed][0].append(s)
                    by_seed[seed][1].append(value)
        rhos = []
        for xs, ys in by_seed.values():
            if len(set(xs)) >= 3 and np.ptp(ys) > 0:
                rhos.append(float(stats.spearmanr(xs, ys).statistic))
        if len(rhos) < 2:
            continue
        test = D.mean_statistics(rhos, 0.0)
        rows.append((criterion, rhos, test))
    adjusted = D.adjust_p_values([t["p_value"] for _, _, t in rows])
    lines = []
    for (criterion, rhos, test), p_adj in zip(rows, adjusted, strict=True):
        low = summaries[(criterion, sparsities[0])]
        high = summaries[(criterion, sparsities[-1])]
        trend = "no clear trend"
        if math.isfinite(p_adj) and p_adj < level:
            trend = "grows" if test["mean"] > 0 else "shrinks"
        line = (
            f"  - {criterion}: {trend} (mean Spearman rho over seeds {test['mean']:.2f} "
            f"[{_fmt(test['ci_low'], 2)}, {_fmt(test['ci_high'], 2)}], p {_p(test['p_value'])}, "
            f"adjusted {_p(p_adj)}); mean ratio {_fmt(low['mean'])} at sparsity "
            f"{sparsities[0]:.3f}, {_fmt(high['mean'])} at {sparsities[-1]:.3f}"
        )
        if trend == "no clear trend":
            line += ". " + _what_would_help(test["mean"], rhos, math.nan, level, "a mean rho")
        lines.append(line)
    measure = "ratio minus the control's ratio" if has_control else "ratio"
    return (
        "1. **Does intensification grow with sparsity?** Per seed, the rank correlation of the "
        f"{measure} with sparsity; the seeds' correlations tested against 0 (t-test, "
        "Benjamini-Hochberg over the criteria):\n" + "\n".join(lines)
    )


def _answer_up_vs_mp(summaries, sparsities, level) -> str | None:
    """2. Per seed, MP - UP averaged over the high sparsities (the control cancels out of a
    difference of two arms paired by seed and round), tested over seeds."""
    high = [s for s in sparsities if s >= HIGH_SPARSITY] or sparsities[-1:]
    per_seed: dict[Any, list[float]] = defaultdict(list)
    wins = 0
    for s in high:
        up, mp = summaries[("undecayed", s)], summaries[("magnitude", s)]
        wins += tables.as_float(up["mean"]) < tables.as_float(mp["mean"])
        up_ratios = _per_seed(up)
        for seed, ratio in _per_seed(mp).items():
            if seed in up_ratios and math.isfinite(ratio - up_ratios[seed]):
                per_seed[seed].append(ratio - up_ratios[seed])
    differences = [float(np.mean(v)) for v in per_seed.values()]
    test = D.mean_statistics(differences, 0.0)
    answer = "not shown"
    if math.isfinite(test["p_value"]) and test["p_value"] < level:
        answer = "yes" if test["mean"] > 0 else "no: it is stronger with UP"
    text = (
        f"2. **Is intensification weaker with UP than with magnitude pruning?** {answer}: at "
        f"sparsity >= {high[0]:.3f} ({len(high)} levels), UP's mean ratio is below MP's at "
        f"{wins} of {len(high)} levels; MP - UP, averaged over these levels per seed, is "
        f"{_fmt(test['mean'])} [{_fmt(test['ci_low'])}, {_fmt(test['ci_high'])}] over "
        f"{len(differences)} seeds (paired t-test p {_p(test['p_value'])}; the control arm "
        "cancels out of this difference)."
    )
    if answer == "not shown":
        noise = math.sqrt(
            D.root_mean_square(
                [
                    tables.as_float(summaries[(c, s)]["measurement_sd"])
                    for c in ("magnitude", "undecayed")
                    for s in high
                ]
            )
            ** 2
            * 2
        )
        text += " " + _what_would_help(test["mean"], differences, noise, level, "a difference")
    return text


def _answer_low_sparsity(summaries, criteria, sparsities, level) -> str:
    """3. De-intensification at low sparsity: against the control arm where the study has one
    (adjusted paired tests), and against ratio = 1 (adjusted)."""
    low = [s for s in sparsities if s <= LOW_SPARSITY]
    has_control = any(c == CONTROL for c, _ in summaries)
    below_control, below_one = [], []
    for criterion in criteria:
        for s in low:
            summary = summaries[(criterion, s)]
            if summary.get("verdict_vs_control") == D.LESS_THAN_CONTROL:
                below_control.append(
                    f"{criterion} at {s:.3f} (ratio - control {_fmt(summary['diff_vs_control'])}, "
                    f"adjusted p {_p(summary['p_vs_control_adjusted'])})"
                )
            if summary["verdict"] == D.DE_INTENSIFICATION:
                below_one.append(
                    f"{criterion} at {s:.3f} (ratio {_fmt(summary['mean'])}, adjusted p "
                    f"{_p(summary['p_adjusted'])})"
                )
    primary = below_control if has_control else below_one
    text = "3. **Is there de-intensification at low sparsity?** "
    if primary:
        text += "yes: " + "; ".join(primary)
    else:
        text += f"no significant case at level {level} (adjusted) " + (
            "against the control arm" if has_control else "against ratio = 1"
        )
    if has_control:
        text += (
            ". Against ratio = 1: "
            + ("; ".join(below_one) if below_one else "no significant case")
            + " (retraining alone moves the ratio too, so the comparison with the control is "
            "the one that isolates pruning)"
        )
    if low:
        lowest = ", ".join(
            f"{c} {_fmt(summaries[(c, low[0])]['mean'])}"
            for c in [*criteria, CONTROL]
            if (c, low[0]) in summaries
        )
        text += f". Mean ratios at the lowest sparsity ({low[0]:.3f}): {lowest}"
        if not primary:
            focus = criteria[0]
            values = list(_versus_control(summaries, focus, low[0]).values())
            noise = tables.as_float(summaries[(focus, low[0])]["measurement_sd"])
            text += ". " + _what_would_help(
                float(np.mean(values)) if values else math.nan,
                values,
                noise,
                level,
                f"a difference ({focus} at {low[0]:.3f}"
                + (", against the control)" if has_control else ", against 1)"),
            )
    return text if text.endswith(".") else text + "."


def answers(results: dict[str, Any]) -> list[str]:
    """The paper's three questions, answered from this run's numbers with the tests against
    the control arm where the study has one."""
    level = results["analysis"]["level"]
    summaries = tables.summaries(results)
    criteria = list(results["config"]["criteria"])
    arms = tables.arms(results)[:-1]
    sparsities = sorted({s for _, s in summaries if s > 0})
    out = [_answer_trend(results, summaries, arms, sparsities, level)]
    if "undecayed" in criteria and "magnitude" in criteria:
        out.append(_answer_up_vs_mp(summaries, sparsities, level))
    out.append(_answer_low_sparsity(summaries, arms, sparsities, level))
    if tables.mitigated_arms(results) and sparsities:
        out.append(_answer_mitigations(results, sparsities[-1], level))
    return out


def _mitigation_rows(results: dict[str, Any], sparsity: float) -> list[dict[str, Any]]:
    """Per arm at ``sparsity``: the largest per-class excess drop over seeds, and for a
    mitigated arm its paired differences from the unmitigated arm of its criterion (excess
    drop, and accuracy cost: unmitigated minus mitigated accuracy)."""
    rows = []
    for arm in tables.arms(results)[:-1]:
        excess = tables.largest_excess_drops(results, arm, sparsity)
        accuracy = {s: r["accuracy"] for s, r in tables.runs_at(results, arm, sparsity).items()}
        row = {
            "arm": arm,
            "excess": D.mean_statistics(list(excess.values())),
            "accuracy": D.mean_statistics([tables.as_float(a) for a in accuracy.values()]),
            "excess_vs": None,
            "cost": None,
            "excess_vs_up": None,
        }
        if arm != UP and UP in tables.arms(results):
            up_excess = tables.largest_excess_drops(results, UP, sparsity)
            row["excess_vs_up"] = D.mean_statistics(tables.paired(excess, up_excess))
        base = tables.unmitigated(arm)
        if base != arm and base in tables.arms(results):
            base_excess = tables.largest_excess_drops(results, base, sparsity)
            base_accuracy = {
                s: r["accuracy"] for s, r in tables.runs_at(results, base, sparsity).items()
            }
            row["excess_vs"] = D.mean_statistics(tables.paired(excess, base_excess))
            row["cost"] = D.mean_statistics(tables.paired(base_accuracy, accuracy))
        rows.append(row)
    for key in ("excess_vs", "cost", "excess_vs_up"):
        tested = [r for r in rows if r[key] is not None]
        adjusted = D.adjust_p_values([r[key]["p_value"] for r in tested])
        for row, p in zip(tested, adjusted, strict=True):
            row[key]["p_adjusted"] = float(p)
    return rows


def _interval(stat: dict[str, float], scale: float = 1.0, digits: int = 3) -> str:
    return (
        f"{_fmt(stat['mean'] * scale, digits)} [{_fmt(stat['ci_low'] * scale, digits)}, "
        f"{_fmt(stat['ci_high'] * scale, digits)}]"
    )


def _answer_mitigations(results: dict[str, Any], sparsity: float, level: float) -> str:
    """4. Per mitigated arm at the highest sparsity: the largest excess drop and the
    accuracy against the unmitigated arm of the same criterion, paired by seed, with
    Benjamini-Hochberg over the mitigated arms."""
    lines = []
    for row in _mitigation_rows(results, sparsity):
        if row["excess_vs"] is None:
            continue
        vs, cost = row["excess_vs"], row["cost"]
        base = tables.unmitigated(row["arm"])
        change = f"not significantly different from {base}'s"
        if tables.as_float(vs["p_adjusted"]) < level:
            change = f"{'smaller' if vs['mean'] < 0 else 'larger'} than {base}'s"
        lines.append(
            f"  - {row['arm']}: largest excess drop {change} (difference "
            f"{_interval(vs, 100, 2)} pts, "
            f"adjusted p {_p(vs['p_adjusted'])}); accuracy cost {_interval(cost, 100, 2)} pts "
            f"(adjusted p {_p(cost['p_adjusted'])})"
        )
    question = (
        "4. **Do the mitigations reduce the largest per-class excess accuracy drop, and at "
        "what cost?**"
    )
    if not lines:
        return (
            f"{question} Not measured: no mitigated arm has its unmitigated arm in this study "
            "(run with `--mitigations none ...` to compare them)."
        )
    return (
        f"{question} At sparsity {sparsity:.3f}, against the unmitigated arm of the same "
        "criterion, paired by seed (t-test, Benjamini-Hochberg over the mitigated arms):\n"
        + "\n".join(lines)
    )


def _environment_text(environment: dict[str, Any] | None) -> str:
    if not environment:
        return "Environment: not recorded.\n\n"
    e = environment
    commit = e.get("git_commit") or "unknown"
    device = e.get("device")
    if e.get("device_name"):
        device = f"{device} ({e['device_name']})"
    return (
        f"Environment: recallprune {e.get('recallprune')} (commit {commit}), torch "
        f"{e.get('torch')}, Python {e.get('python')}; CPU {e.get('cpu')}, instruction set "
        f"{e.get('cpu_capability')}"
        + (
            f" (ATEN_CPU_CAPABILITY={e['aten_cpu_capability_env']})"
            if e.get("aten_cpu_capability_env")
            else ""
        )
        + f", {e.get('threads')} thread{'' if e.get('threads') == 1 else 's'}; device {device}; "
        f"{e.get('backend')} backend. "
        "Training is chaotic: another instruction set or device changes the trajectories, so "
        "compare reports only where these match, and trust only answers that hold across "
        "them.\n\n"
    )


def _ratio_table(summaries, arms, sparsities) -> str:
    rows = []
    for arm in arms:
        for s in sparsities:
            summary = summaries.get((arm, s))
            if summary is None:
                continue
            vs = "—"
            if summary.get("diff_vs_control") is not None:
                vs = (
                    f"{_fmt(summary['diff_vs_control'])} [{_fmt(summary['diff_vs_control_ci_low'])}"
                    f", {_fmt(summary['diff_vs_control_ci_high'])}], p "
                    f"{_p(summary['p_vs_control'])} / {_p(summary['p_vs_control_adjusted'])}: "
                    f"{summary['verdict_vs_control']}"
                )
            rows.append(
                [
                    arm,
                    f"{s:.3f}",
                    f"{_fmt(summary['mean'])} "
                    f"[{_fmt(summary['ci_low'])}, {_fmt(summary['ci_high'])}]",
                    f"{_p(summary['p_value'])} / {_p(summary['p_adjusted'])}",
                    _p(summary["wilcoxon_p_value"]),
                    summary["verdict"],
                    vs,
                    _fmt(summary["min_detectable_effect"]),
                    _fmt(summary["measurement_sd"]),
                    f"{_fmt(_percent(summary['accuracy_change']), 2)} pts",
                ]
            )
    return _table(
        [
            "criterion",
            "sparsity",
            "ratio [95% CI]",
            "p / adjusted",
            "Wilcoxon p",
            "verdict",
            "ratio - control [95% CI], p / adjusted: verdict",
            "detectable",
            "measurement sd",
            "accuracy change",
        ],
        rows,
    )


def _setup_text(config: dict[str, Any]) -> str:
    retrain_lr = config["lr"] if config["retrain"] == "rewind" else config["finetune_lr"]
    mitigations = [m for m in config.get("mitigations", []) if m != "none"]
    mitigated = (
        f", each also fine-tuned with {' and '.join(mitigations)} (arms CRITERION+MITIGATION)"
        if mitigations
        else ""
    )
    return (
        f"Seeds {config['seeds']}; criteria {', '.join(config['criteria'])}{mitigated} and a "
        "control arm "
        f"(the same retraining, nothing pruned); {config['rounds']} rounds of pruning "
        f"{config['fraction']:.0%} of the remaining weights ({config['scope']} scope, retrain: "
        f"{config['retrain']}). Training: UndecayedSGD, lr {config['lr']}, momentum "
        f"{config['momentum']}, weight decay {config['weight_decay']}, "
        f"batch {config['batch_size']}, "
        f"{config['epochs']} epochs (cosine schedule) for the dense model; "
        f"{config['finetune_epochs']} epochs at lr {retrain_lr} after each round. "
        f"Device: {config['device']}.\n\n"
    )


def _definitions_text(level: float) -> str:
    return (
        "Definitions (this library's, following the paper's wording): gap d[c,t] = recall[c,t] - "
        "accuracy[t]; model-level intensification ratio alpha[t] = sum_c d[c,0] d[c,t] / "
        "sum_c d[c,0]^2 (> 1: intensification, < 1: de-intensification). Intervals are 95% "
        "t-intervals over seeds; p: one-sample t-test of alpha = 1 (Wilcoxon beside it), and "
        "the paired t-test of alpha minus the control arm's alpha at the same seed and round. "
        "Each family of tests (the criteria's ratio tests, the control's, the tests against the "
        "control, the per-class tests of one sparsity) is corrected with Benjamini-Hochberg; "
        f"verdicts come from the adjusted p-values at level {level}. Retraining alone and "
        "measurement noise move the ratio too (regression to the mean pulls it below 1), which "
        "is why each criterion is tested against the control. 'detectable': the smallest "
        "|ratio - 1| these seeds could detect (power 0.8); 'measurement sd': the ratio's spread "
        "under resampling of the test set.\n\n"
    )


def _accuracy_section(results: dict[str, Any]) -> str:
    summaries = tables.summaries(results)
    arms = tables.arms(results)
    rows = []
    for s in tables.sparsities(results):
        row = [f"{s:.3f}"]
        for arm in arms:
            mean, half = tables.mean_half(tables.accuracies(results, arm, s))
            row.append(f"{_fmt(mean, 4)} ± {_fmt(half, 4)}" if (arm, s) in summaries else "n/a")
        rows.append(row)
    return (
        "## Accuracy\n\nMean test accuracy ± 95% interval over seeds, by nominal sparsity.\n\n"
        + _table(["sparsity", *arms], rows)
        + "\n\n"
    )


def _ratio_section(results: dict[str, Any]) -> str:
    table = _ratio_table(
        tables.summaries(results), tables.arms(results), tables.sparsities(results)
    )
    return (
        "## Intensification ratio\n\nModel-level ratio per criterion and sparsity: mean [95% "
        "interval], raw and adjusted p of ratio = 1, Wilcoxon p, verdict; the difference from "
        "the control arm with its raw and adjusted p and verdict; the detectable effect, the "
        "measurement noise, and the accuracy change from the dense model.\n\n" + table + "\n\n"
    )


def _mitigation_section(results: dict[str, Any]) -> str:
    """Per arm, at the highest sparsity and at the one nearest HIGH_SPARSITY: the largest
    per-class excess drop on the test set, the accuracy, the mitigation's effect on both
    against the unmitigated arm, and where the multipliers ended."""
    if not tables.mitigated_arms(results):
        return ""
    config = results["config"]
    pruned = [s for s in tables.sparsities(results) if s > 0]
    if not pruned:
        return ""
    levels = sorted({min(pruned, key=lambda s: abs(s - HIGH_SPARSITY)), pruned[-1]})
    rows = []
    for s in levels:
        for row in _mitigation_rows(results, s):
            vs, cost = row["excess_vs"], row["cost"]
            runs = tables.runs_at(results, row["arm"], s).values()
            last = [r["multipliers"][-1] for r in runs if r.get("multipliers")]
            rows.append(
                [
                    row["arm"],
                    f"{s:.3f}",
                    _interval(row["excess"], 100, 2),
                    "—" if vs is None else f"{_interval(vs, 100, 2)}, p {_p(vs['p_adjusted'])}",
                    "—"
                    if row["excess_vs_up"] is None
                    else f"{_interval(row['excess_vs_up'], 100, 2)}, p "
                    f"{_p(row['excess_vs_up']['p_adjusted'])}",
                    _interval(row["accuracy"], 100, 2),
                    "—"
                    if cost is None
                    else f"{_interval(cost, 100, 2)}, p {_p(cost['p_adjusted'])}",
                    "—" if not last else _fmt(float(np.mean([np.max(m) for m in last]))),
                ]
            )
    table = _table(
        [
            "arm",
            "sparsity",
            "largest excess drop, pts [95% CI]",
            "- unmitigated [95% CI], adjusted p",
            "- UP [95% CI], adjusted p",
            "accuracy, % [95% CI]",
            "accuracy cost, pts [95% CI], adjusted p",
            "final max multiplier",
        ],
        rows,
    )
    return (
        "## Mitigations\n\nArms named CRITERION+MITIGATION fine-tune after every round under "
        "a per-class constraint against their dense model, measured on the training set: "
        "`constrained`, the excess accuracy drop (dense recall - recall) - (dense accuracy - "
        "accuracy) <= epsilon; `loss-gap`, the class's mean loss - the dense model's <= "
        f"epsilon (epsilon {config.get('epsilon')}, multipliers' step "
        f"{config.get('multiplier_step')}, updated once per fine-tuning epoch and carried "
        "from round to round). A mitigated arm prunes with the same seeds and data order as "
        "its criterion's unmitigated arm. Per arm, on the test set: the largest per-class "
        "excess accuracy drop (what the constraint bounds) over seeds, its difference from "
        "the unmitigated arm and from UP (plain `undecayed`, where the study has it), the "
        "accuracy cost (unmitigated minus mitigated accuracy), "
        "paired by seed with Benjamini-Hochberg over each column's tests of a sparsity; and the "
        "largest multiplier after that round's last epoch, mean over seeds (`multipliers.png` "
        "shows their trajectories).\n\n" + table + "\n\n"
    )


def _class_section(results: dict[str, Any]) -> str:
    analysis = results["analysis"]
    level = analysis["level"]
    arms = tables.arms(results)
    sparsities = tables.sparsities(results)
    dense_runs = tables.dense_runs(results)
    num_classes = len(dense_runs[0]["recall"]) if dense_runs else 0
    top = sparsities[-1] if sparsities else 0.0
    header = ["class", "dense"] + [f"{arm} @ {top:.3f}" for arm in arms]
    class_tests = {
        (t["criterion"], tables.level(t["sparsity"]), t["class_index"]): t
        for t in analysis["class_tests"]
    }
    rows = []
    for c in range(num_classes):
        dense_recall = [r["recall"][c] for r in dense_runs]
        row = [str(c), _fmt(tables.mean_half(dense_recall)[0])]
        for arm in arms:
            test = class_tests.get((arm, tables.level(top), c))
            if test is None:
                row.append("n/a")
                continue
            mark = "*" if tables.as_float(test.get("p_adjusted")) < level else ""
            row.append(f"{_fmt(test['pruned_recall_mean'])}{mark}")
        rows.append(row)
    return (
        "## Per-class recall\n\nMean recall over seeds, dense and at the highest sparsity; n/a "
        "marks a class with no support in the test set (recall undefined).\n\n"
        + _table(header, rows)
        + "\n\n`*`: the class's gap changed significantly (Welch's t-test, dense against "
        f"pruned, Benjamini-Hochberg over this table's tests, level {level}).\n\n"
    )


_CAPTIONS = {
    "intensification.png": "Intensification ratio against weights remaining, a panel per "
    "criterion beside the control arm (95% bands)",
    "recall_gaps.png": "Pruned against dense recall gaps per class at the last round",
    "accuracy.png": "Accuracy against weights remaining, a panel per criterion beside the "
    "control arm (95% bands)",
    "multipliers.png": "The mitigations' multipliers through the fine-tuning epochs of every "
    "round, largest and mean over classes (mean over seeds)",
}


def _plots_section(results: dict[str, Any]) -> str:
    images = "".join(f"![{_CAPTIONS[name]}]({name})\n\n" for name in plot_names(results))
    return (
        "## Plots\n\n"
        + images
        + "Files: `results.json` and `results.csv` (every run's confusion matrix, recalls, "
        "accuracy, sparsity, criterion, seed and round), `config.json` (the resolved "
        "configuration).\n"
    )


def render_report(results: dict[str, Any], out: Path) -> str:
    config = results["config"]
    dense_runs = tables.dense_runs(results)
    dense_acc, dense_half = tables.mean_half([r["accuracy"] for r in dense_runs])
    return "".join(
        [
            f"# Recall-distortion study: {config['dataset']} / {config['model']}\n\n",
            _setup_text(config),
            _environment_text(results.get("environment")),
            f"Dense test accuracy: {_fmt(dense_acc, 4)} ± {_fmt(dense_half, 4)} (95% interval "
            f"over {len(dense_runs)} seeds).\n\n",
            _definitions_text(results["analysis"]["level"]),
            "## Answers\n\n" + "\n".join(answers(results)) + "\n\n",
            _accuracy_section(results),
            _ratio_section(results),
            _mitigation_section(results),
            _class_section(results),
            _plots_section(results),
        ]
    )


def write_csv(results: dict[str, Any], path: Path) -> None:
    runs = results["runs"]
    num_classes = len(runs[0]["recall"]) if runs else 0
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    leading = RUN_FIELDS[: RUN_FIELDS.index("accuracy") + 1]  # seed ... accuracy
    writer.writerow([*leading, *[f"recall_{c}" for c in range(num_classes)], "confusion"])
    for r in runs:
        writer.writerow(
            [
                *[r[key] for key in leading],
                *["" if v is None else v for v in r["recall"]],
                json.dumps(r["confusion"]),
            ]
        )
    atomic_write_text(path, buffer.getvalue())


def write_outputs(
    config: dict[str, Any],
    runs: list[dict[str, Any]],
    out: Path,
    environment: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write results.json, results.csv, report.md and the plots; returns the results.
    ``model``: the model's name, width, parameter count and training samples."""
    results = build_results(config, runs, environment, model)
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
    results = check_results(read_json(path, "results file"), path)
    # The environment the runs were computed in, not this process's.
    return write_outputs(
        results["config"],
        results["runs"],
        out,
        results.get("environment"),
        results.get("model"),
    )
