"""``recallprune compare DIR...``: the paper's questions across studies.

A single study answers how the intensification ratio moves with sparsity and between criteria
on one task and one model. Whether intensification is stronger on harder tasks and on smaller
models needs several studies: this module pools their per-seed model-level ratios and, per
criterion, fits

    ratio = b0 + b1 * sparsity + b2 * dense_error + b3 * log2(params)

by ordinary least squares on the rows with sparsity > 0 (a dense model's ratio is 1 by
definition), with standard errors clustered by (study, seed): a seed's ratios at successive
rounds are one pruning trajectory, not independent draws. ``dense_error`` is the study's mean
dense test error (its measured difficulty; a study-level value, so that a seed's own noise does
not enter both sides), ``params`` the model's parameter count. The control arm's rows carry the
nominal sparsity of their round. A factor that does not vary across the studies is left out of
the fit, and the output says so.

Whether UP's ratio is below magnitude pruning's is tested across studies on the differences
MP - UP, paired by study, seed and round, averaged per (study, seed) at high sparsity and
tested over those units.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import distortion as D
from .._extras import study_imports
from .config import study_arms
from .files import StudyError, atomic_write_text, read_json
from .records import CONTROL, DENSE

CSV_FIELDS = ("study", "criterion", "seed", "sparsity", "dense_error", "params", "ratio")
TERMS = ("intercept", "sparsity", "dense_error", "log2_params")
HIGH_SPARSITY = 0.8
LOW_SPARSITY = 0.5


@dataclass
class StudyRows:
    """One study's pooled rows and what identifies it."""

    name: str
    num_classes: int
    criteria: tuple[str, ...]
    dense_error: float
    params: int
    rows: list[dict[str, Any]]


def model_params(results: dict[str, Any]) -> int:
    """The parameter count of a study's model: recorded by the study, or else counted from a
    model built for its dataset."""
    recorded = (results.get("model") or {}).get("params")
    if recorded:
        return int(recorded)
    config = results["config"]
    if config.get("params"):
        return int(config["params"])
    from .datasets import load_dataset
    from .models import build_model

    data = load_dataset(
        config["dataset"],
        data_root=config.get("data_root", "data"),
        difficulty=config.get("difficulty", 1.0),
        imbalance=config.get("imbalance", 0.0),
    )
    model = build_model(
        config["model"], data.input_shape, data.num_classes, config.get("width", 1.0)
    )
    return sum(p.numel() for p in model.parameters())


def load_study(folder: Path, name: str | None = None) -> StudyRows:
    """The per-seed model-level ratios of one study folder, one row per (criterion, seed,
    round) with sparsity > 0."""
    folder = Path(folder)
    path = folder / "results.json"
    if not path.is_file():
        raise StudyError(f"{path} does not exist: is {folder} a finished study's folder?")
    results = read_json(path, "results file")
    problem = _results_problem(results)
    if problem is not None:
        raise StudyError(f"{path} is not a recallprune results file ({problem})")
    config, runs = results["config"], results["runs"]
    dense = [r for r in runs if r["criterion"] == DENSE]
    if not dense:
        raise StudyError(f"{path} holds no dense model")
    num_classes = len(dense[0]["recall"])
    accuracies = [r["accuracy"] for r in dense if r["accuracy"] is not None]
    if not accuracies:
        raise StudyError(f"{path}: no dense model has an accuracy (empty test set?)")
    dense_error = 1.0 - float(np.mean(accuracies))
    params = model_params(results)
    study = name or folder.name
    rows = []
    for summary in results["analysis"]["summaries"]:
        if summary["sparsity"] <= 0:
            continue
        for seed, ratio in zip(summary["seeds"], summary["ratios"], strict=True):
            if ratio is None:
                continue
            rows.append(
                {
                    "study": study,
                    "criterion": summary["criterion"],
                    "seed": seed,
                    "sparsity": float(summary["sparsity"]),
                    "dense_error": dense_error,
                    "params": params,
                    "ratio": float(ratio),
                }
            )
    arms = tuple(study_arms(config["criteria"], config.get("mitigations")))
    return StudyRows(study, num_classes, arms, dense_error, params, rows)


# What compare reads of a results file: the entries below, of these JSON types.
_RUN_KEYS = {"criterion": str, "recall": list, "accuracy": (int, float)}
_SUMMARY_KEYS = {"criterion": str, "sparsity": (int, float), "seeds": list, "ratios": list}


def _results_problem(results: Any) -> str | None:
    """What keeps ``results`` from being compared, or None."""
    if not isinstance(results, dict):
        return f"it holds a JSON {type(results).__name__}, not an object"
    missing = [key for key in ("config", "runs", "analysis") if key not in results]
    if missing:
        return f"no {' and no '.join(repr(key) for key in missing)} entry"
    if not isinstance(results["config"], dict) or not isinstance(
        results["config"].get("criteria"), list
    ):
        return "'config' holds no list of criteria"
    analysis = results["analysis"]
    if not isinstance(analysis, dict) or not isinstance(analysis.get("summaries"), list):
        return "'analysis' holds no list of summaries"
    for where, entries, keys in (
        ("runs", results["runs"], _RUN_KEYS),
        ("analysis summaries", analysis["summaries"], _SUMMARY_KEYS),
    ):
        if not isinstance(entries, list):
            return f"its {where} are not a list"
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict):
                return f"entry {index} of its {where} is not an object"
            for key, kind in keys.items():
                value = entry.get(key)
                # A NaN accuracy is saved as null.
                if not isinstance(value, kind) and not (key == "accuracy" and value is None):
                    return f"entry {index} of its {where} has no valid {key!r}"
    for index, summary in enumerate(analysis["summaries"]):
        seeds, ratios = len(summary["seeds"]), len(summary["ratios"])
        if seeds != ratios:
            return f"summary {index} has {seeds} seeds but {ratios} ratios"
    return None


def check_comparable(studies: list[StudyRows]) -> None:
    """Studies pooled in one fit must ask the same question: the same number of classes and
    the same criteria, and distinct names."""
    if len(studies) < 2:
        raise StudyError("compare needs at least two study folders")
    names = [s.name for s in studies]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise StudyError(f"study names must be distinct, got {', '.join(repeated)} twice")
    first = studies[0]
    for other in studies[1:]:
        if other.num_classes != first.num_classes:
            raise StudyError(
                f"studies {first.name} and {other.name} differ in their number of classes "
                f"({first.num_classes} and {other.num_classes}): their ratios are not comparable"
            )
        if set(other.criteria) != set(first.criteria):
            raise StudyError(
                f"studies {first.name} and {other.name} differ in their criteria "
                f"({', '.join(first.criteria)} and {', '.join(other.criteria)})"
            )


def design(rows: list[dict[str, Any]]) -> tuple[np.ndarray, list[str]]:
    """The regression's design matrix and the names of its columns, without the factors that
    do not vary in ``rows`` (they would be collinear with the intercept)."""
    columns = {
        "intercept": np.ones(len(rows)),
        "sparsity": np.array([r["sparsity"] for r in rows]),
        "dense_error": np.array([r["dense_error"] for r in rows]),
        "log2_params": np.log2([float(r["params"]) for r in rows]),
    }
    kept = [t for t in TERMS if t == "intercept" or np.ptp(columns[t]) > 0]
    return np.column_stack([columns[t] for t in kept]), kept


def fit(rows: list[dict[str, Any]], confidence: float = 0.95) -> list[dict[str, Any]]:
    """OLS of the ratio on the design's terms with standard errors clustered by (study,
    seed); one ``{term, estimate, std_error, ci_low, ci_high, p_value}`` per term kept."""
    with study_imports("recallprune compare"):
        import statsmodels.api as sm

    x, terms = design(rows)
    y = np.array([r["ratio"] for r in rows])
    clusters = {
        key: i for i, key in enumerate(sorted({(r["study"], str(r["seed"])) for r in rows}))
    }
    groups = np.array([clusters[(r["study"], str(r["seed"]))] for r in rows])
    if len(rows) <= x.shape[1] or len(clusters) < 2:
        raise StudyError(
            f"too few rows ({len(rows)}) or seeds ({len(clusters)}) to fit {', '.join(terms)}"
        )
    # t intervals with (clusters - 1) degrees of freedom: few clusters, so not the normal.
    result = sm.OLS(y, x).fit(cov_type="cluster", cov_kwds={"groups": groups}, use_t=True)
    low, high = result.conf_int(alpha=1 - confidence).T
    return [
        {
            "term": term,
            "estimate": float(result.params[i]),
            "std_error": float(result.bse[i]),
            "ci_low": float(low[i]),
            "ci_high": float(high[i]),
            "p_value": float(result.pvalues[i]),
        }
        for i, term in enumerate(terms)
    ]


def paired_up_vs_mp(rows: list[dict[str, Any]], up: str = "undecayed") -> dict[str, Any]:
    """MP - UP paired by study, seed and round at sparsity >= 0.8, averaged per (study, seed)
    and tested over those units."""
    return paired_difference(rows, "magnitude", up)


def paired_difference(rows: list[dict[str, Any]], first: str, second: str) -> dict[str, Any]:
    """``first``'s ratio minus ``second``'s, paired by study, seed and round at sparsity >=
    0.8, averaged per (study, seed) and tested over those units."""
    by_key = {(r["study"], r["seed"], round(r["sparsity"], 6), r["criterion"]): r for r in rows}
    units: dict[tuple[str, Any], list[float]] = defaultdict(list)
    for (study, seed, sparsity, criterion), row in by_key.items():
        if criterion != first or sparsity < HIGH_SPARSITY:
            continue
        other = by_key.get((study, seed, sparsity, second))
        if other is not None:
            units[(study, seed)].append(row["ratio"] - other["ratio"])
    differences = [float(np.mean(v)) for v in units.values()]
    return {"n_units": len(differences), **D.mean_statistics(differences, 0.0)}


def compare(folders: list[Path], level: float = 0.05) -> dict[str, Any]:
    """Everything ``compare.json`` holds: the pooled rows, the fits per criterion with
    Benjamini-Hochberg over all slope tests, and the answers."""
    studies = [load_study(Path(f)) for f in folders]
    check_comparable(studies)
    rows = [row for s in studies for row in s.rows]
    criteria = [*studies[0].criteria, CONTROL]
    coefficients = []
    dropped = [t for t in TERMS[1:] if t not in design([r for r in rows if r["sparsity"] > 0])[1]]
    for criterion in criteria:
        subset = [r for r in rows if r["criterion"] == criterion]
        if subset:
            coefficients += [dict(c, criterion=criterion) for c in fit(subset)]
    slopes = [c for c in coefficients if c["term"] != "intercept"]
    for c, p in zip(slopes, D.adjust_p_values([c["p_value"] for c in slopes]), strict=True):
        c["p_adjusted"] = float(p)
    result = {
        "level": level,
        "studies": [
            {
                "name": s.name,
                "folder": str(f),
                "dense_error": s.dense_error,
                "params": s.params,
                "num_classes": s.num_classes,
            }
            for s, f in zip(studies, folders, strict=True)
        ],
        "terms_left_out": dropped,
        "coefficients": coefficients,
        "rows": rows,
    }
    if {"magnitude", "undecayed"} <= set(criteria):
        result["up_vs_mp"] = paired_up_vs_mp(rows)
    # UP with other gradient estimates (undecayed:full, ...): each against magnitude pruning
    # and against UP from n_batches batches.
    estimates = [c for c in criteria if c.startswith("undecayed:")]
    if estimates and {"magnitude", "undecayed"} <= set(criteria):
        result["up_estimates"] = {
            arm: {
                "mp_minus_arm": paired_difference(rows, "magnitude", arm),
                "up_minus_arm": paired_difference(rows, "undecayed", arm),
            }
            for arm in estimates
        }
    result["answers"] = answers(result)
    return result


def _coefficient(result, criterion: str, term: str) -> dict[str, Any] | None:
    for c in result["coefficients"]:
        if c["criterion"] == criterion and c["term"] == term:
            return c
    return None


def _says(c: dict[str, Any] | None, level: float, positive: str, negative: str) -> str:
    if c is None:
        return "not asked (the factor does not vary across these studies)"
    numbers = (
        f"slope {c['estimate']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}], p "
        f"{c['p_value']:.2g}, adjusted {c['p_adjusted']:.2g}"
    )
    if c["p_adjusted"] < level:
        return f"{positive if c['estimate'] > 0 else negative} ({numbers})"
    return f"not shown ({numbers})"


def answers(result: dict[str, Any]) -> list[dict[str, str]]:
    """The paper's five questions, each with its answer per criterion and its numbers."""
    level = result["level"]
    criteria = sorted({c["criterion"] for c in result["coefficients"]} - {CONTROL})
    out = []
    for question, term, positive, negative in (
        ("Does intensification grow with the pruning ratio?", "sparsity", "yes", "no: it shrinks"),
        (
            "Is intensification stronger on more difficult tasks?",
            "dense_error",
            "yes",
            "no: it is weaker",
        ),
        (
            "Is intensification stronger on less complex models?",
            "log2_params",
            "no: it is weaker on smaller models",
            "yes",
        ),
    ):
        lines = [
            f"{c}: {_says(_coefficient(result, c, term), level, positive, negative)}"
            for c in criteria
        ]
        out.append({"question": question, "answer": "; ".join(lines)})
    up = result.get("up_vs_mp")
    if up is not None:
        verdict = "not shown"
        if math.isfinite(up["p_value"]) and up["p_value"] < level:
            verdict = "yes" if up["mean"] > 0 else "no: it is stronger with UP"
        out.append(
            {
                "question": "Is intensification weaker with UP than with magnitude pruning?",
                "answer": f"{verdict} (MP - UP at sparsity >= {HIGH_SPARSITY}, per study and "
                f"seed: {up['mean']:+.3f} [{up['ci_low']:+.3f}, {up['ci_high']:+.3f}], p "
                f"{up['p_value']:.2g}, n = {up['n_units']})",
            }
        )
    if "up_estimates" in result:
        out.append(_answer_estimates(result["up_estimates"], level))
    low = [
        r
        for r in result["rows"]
        if r["sparsity"] <= LOW_SPARSITY and r["criterion"] not in (CONTROL,)
    ]
    control = {
        (r["study"], r["seed"], round(r["sparsity"], 6)): r["ratio"]
        for r in result["rows"]
        if r["criterion"] == CONTROL
    }
    units: dict[tuple[str, Any], list[float]] = defaultdict(list)
    for r in low:
        key = (r["study"], r["seed"], round(r["sparsity"], 6))
        if key in control:
            units[(r["study"], r["seed"])].append(r["ratio"] - control[key])
    test = D.mean_statistics([float(np.mean(v)) for v in units.values()], 0.0)
    verdict = "not shown"
    if math.isfinite(test["p_value"]) and test["p_value"] < level:
        verdict = "yes" if test["mean"] < 0 else "no: pruning intensifies more than retraining"
    out.append(
        {
            "question": "Is there de-intensification at low pruning ratios?",
            "answer": f"{verdict} (all criteria, ratio - control at sparsity <= {LOW_SPARSITY}, "
            f"averaged per study and seed: {test['mean']:+.3f} [{test['ci_low']:+.3f}, "
            f"{test['ci_high']:+.3f}], p {test['p_value']:.2g}, n = {len(units)})",
        }
    )
    return out


def _answer_estimates(estimates: dict[str, dict[str, Any]], level: float) -> dict[str, str]:
    def numbers(test: dict[str, Any]) -> str:
        significant = math.isfinite(test["p_value"]) and test["p_value"] < level
        return (
            f"{test['mean']:+.3f} [{test['ci_low']:+.3f}, {test['ci_high']:+.3f}], p "
            f"{test['p_value']:.2g}{' (significant)' if significant else ''}"
        )

    parts = [
        f"{arm}: MP - it {numbers(tests['mp_minus_arm'])}; UP - it {numbers(tests['up_minus_arm'])}"
        for arm, tests in estimates.items()
    ]
    return {
        "question": "Does UP's gradient estimate change its intensification?",
        "answer": f"at sparsity >= {HIGH_SPARSITY}, per study and seed, against magnitude "
        "pruning and against UP from --n-batches batches: " + "; ".join(parts),
    }


def write_compare(result: dict[str, Any], out: Path) -> None:
    """compare.md, compare.json, compare.csv and one plot per factor under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.json", json.dumps(D.json_safe(result), indent=1) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for row in result["rows"]:
        writer.writerow({k: row[k] for k in CSV_FIELDS})
    atomic_write_text(out / "compare.csv", buffer.getvalue())
    atomic_write_text(out / "compare.md", render(result))
    write_plots(result, out)


def render(result: dict[str, Any]) -> str:
    lines = ["# Recall distortion across studies", ""]
    lines.append("| study | dense error | parameters | classes |")
    lines.append("| --- | --- | --- | --- |")
    for s in result["studies"]:
        lines.append(
            f"| {s['name']} | {s['dense_error']:.4f} | {s['params']:,} | {s['num_classes']} |"
        )
    lines += [
        "",
        "Per criterion, ordinary least squares of the per-seed model-level ratio on sparsity, "
        "the study's dense error and log2 of the parameter count (rows with sparsity > 0), "
        "standard errors clustered by study and seed; p adjusted with Benjamini-Hochberg over "
        f"all slopes; level {result['level']}.",
    ]
    if result["terms_left_out"]:
        lines.append(
            "Left out (they do not vary across these studies): "
            + ", ".join(result["terms_left_out"])
            + "."
        )
    lines += ["", "## Answers", ""]
    for i, a in enumerate(result["answers"], 1):
        lines.append(f"{i}. **{a['question']}** {a['answer']}")
    lines += ["", "## Coefficients", ""]
    lines.append("| criterion | term | estimate | 95% CI | p | adjusted p |")
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for c in result["coefficients"]:
        adjusted = f"{c['p_adjusted']:.2g}" if "p_adjusted" in c else "—"
        lines.append(
            f"| {c['criterion']} | {c['term']} | {c['estimate']:+.4f} | "
            f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] | {c['p_value']:.2g} | {adjusted} |"
        )
    lines += ["", "![ratio against each factor](compare.png)", ""]
    return "\n".join(lines)


def write_plots(result: dict[str, Any], out: Path) -> None:
    with study_imports("the plots"):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

    rows = result["rows"]
    criteria = sorted({r["criterion"] for r in rows})
    factors = (
        ("sparsity", "sparsity", lambda r: r["sparsity"]),
        ("dense error (difficulty)", "dense_error", lambda r: r["dense_error"]),
        ("parameters (log2)", "log2_params", lambda r: math.log2(r["params"])),
    )
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    for ax, (label, _, value) in zip(axes, factors, strict=True):
        for criterion in criteria:
            subset = [r for r in rows if r["criterion"] == criterion]
            groups: dict[float, list[float]] = defaultdict(list)
            for r in subset:
                groups[round(value(r), 6)].append(r["ratio"])
            xs = sorted(groups)
            ax.plot(
                xs,
                [np.mean(groups[x]) for x in xs],
                "--" if criterion == CONTROL else "-",
                marker="o",
                markersize=3,
                label=criterion,
            )
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xlabel(label)
        ax.set_title(f"mean ratio against {label}", fontsize=10)
    axes[0].set_ylabel("intensification ratio")
    axes[0].legend(fontsize=8)
    fig.suptitle("Recall distortion across studies")
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=120)
    plt.close(fig)
