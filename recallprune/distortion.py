"""Recall-distortion analysis: per-class recall gaps, intensification ratios and their
statistics across seeds.

Definitions (this library's, following the wording of Good et al., NeurIPS 2022, "Recall
Distortion in Neural Network Pruning and the Undecayed Pruning Algorithm", and the
normalisation of recall by accuracy of Hooker et al. 2019). For class ``c`` of a model pruned
to sparsity ``t`` (``t = 0``: the dense model) with recall ``r[c,t]`` and accuracy ``a[t]``:

- gap: ``d[c,t] = r[c,t] - a[t]``; relative gap: ``r[c,t] / a[t] - 1``;
- class-level intensification ratio: ``alpha[c,t] = d[c,t] / d[c,0]`` (NaN where
  ``|d[c,0]|`` is below a tolerance);
- model-level intensification ratio: ``alpha[t] = sum_c d[c,0] d[c,t] / sum_c d[c,0]**2``,
  the least-squares slope (through the origin) of pruned gaps on dense gaps;
- ``alpha > 1``: intensification (classes drift further from the accuracy); ``alpha < 1``:
  de-intensification. Classes with no support (NaN recall) are left out.

Across seeds, each a dense model and its pruned descendants: the mean of ``alpha[t]``, a 95%
(or chosen) confidence interval, a one-sample t-test of ``alpha[t] = 1`` and a Wilcoxon
signed-rank test, and a verdict from the t-test at the chosen level. Per class: Welch's
t-test of the gaps, dense against pruned.

Everything takes tensors or numpy arrays and returns plain data (dataclasses with
``to_dict()`` that serialise to JSON; NaN becomes ``None``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats

INTENSIFICATION = "intensification"
DE_INTENSIFICATION = "de-intensification"
INCONCLUSIVE = "inconclusive"


def _array(x: Any, dtype=np.float64) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _json_number(x: Any) -> Any:
    if isinstance(x, float | np.floating):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def _to_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_to_json(v) for v in value.tolist()]
    return _json_number(value)


def recall_and_accuracy(confusion: Any) -> tuple[np.ndarray, float]:
    """Per-class recall (NaN without support) and accuracy of a ``[C, C]`` confusion matrix
    (rows: true class)."""
    counts = _array(confusion)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"confusion must be a square [C, C] matrix, got shape {counts.shape}")
    support = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.diag(counts) / support
        accuracy = float(np.trace(counts) / counts.sum()) if counts.sum() > 0 else math.nan
    return recall, accuracy


def recall_gaps(recall: Any, accuracy: Any, relative: bool = False) -> np.ndarray:
    """``d = r - a`` (or ``r / a - 1`` when ``relative``); ``recall`` is ``[..., C]`` and
    ``accuracy`` broadcasts against ``recall[..., 0]``."""
    recall = _array(recall)
    accuracy = _array(accuracy)[..., None]
    return recall / accuracy - 1.0 if relative else recall - accuracy


def class_intensification_ratios(
    dense_gaps: Any, pruned_gaps: Any, tol: float = 1e-3
) -> np.ndarray:
    """``alpha[c] = d[c,t] / d[c,0]``; NaN where ``|d[c,0]| < tol`` (the ratio of a class that
    sits at the accuracy is undefined)."""
    dense = _array(dense_gaps)
    pruned = _array(pruned_gaps)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.abs(dense) < tol, np.nan, pruned / dense)


def intensification_ratio(dense_gaps: Any, pruned_gaps: Any) -> float:
    """Model-level ratio ``sum_c d0 * dt / sum_c d0**2`` over classes where both are finite;
    NaN when all dense gaps are zero."""
    dense = _array(dense_gaps)
    pruned = _array(pruned_gaps)
    if dense.shape != pruned.shape:
        raise ValueError(f"gap shapes differ: dense {dense.shape}, pruned {pruned.shape}")
    finite = np.isfinite(dense) & np.isfinite(pruned)
    denominator = float(np.sum(dense[finite] ** 2))
    if denominator == 0.0:
        return math.nan
    return float(np.sum(dense[finite] * pruned[finite]) / denominator)


@dataclass
class RatioSummary:
    """The model-level ratio of one (criterion, sparsity) across seeds."""

    criterion: str
    sparsity: float
    n_seeds: int
    ratios: list[float]
    mean: float
    ci_low: float
    ci_high: float
    t_statistic: float
    p_value: float
    wilcoxon_p_value: float
    verdict: str
    mean_accuracy: float
    mean_dense_accuracy: float
    accuracy_change: float

    def to_dict(self) -> dict[str, Any]:
        return _to_json(asdict(self))


@dataclass
class ClassGapTest:
    """Welch's t-test of one class's gap, dense against pruned, across seeds."""

    criterion: str
    sparsity: float
    class_index: int
    dense_gap_mean: float
    pruned_gap_mean: float
    dense_recall_mean: float
    pruned_recall_mean: float
    t_statistic: float
    p_value: float

    def to_dict(self) -> dict[str, Any]:
        return _to_json(asdict(self))


@dataclass
class DistortionAnalysis:
    """Everything :func:`analyze` finds: a summary per (criterion, sparsity) and the per-class
    tests."""

    level: float
    confidence: float
    relative: bool
    summaries: list[RatioSummary] = field(default_factory=list)
    class_tests: list[ClassGapTest] = field(default_factory=list)

    def summary(self, criterion: str, sparsity: float) -> RatioSummary:
        for s in self.summaries:
            if s.criterion == criterion and math.isclose(s.sparsity, sparsity, abs_tol=1e-9):
                return s
        raise KeyError(f"no summary for criterion {criterion!r} at sparsity {sparsity}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "confidence": self.confidence,
            "relative": self.relative,
            "summaries": [s.to_dict() for s in self.summaries],
            "class_tests": [t.to_dict() for t in self.class_tests],
        }


def verdict(mean: float, p_value: float, level: float = 0.05) -> str:
    """``intensification`` / ``de-intensification`` where the t-test rejects ``alpha = 1`` at
    ``level``, in the direction of the mean; ``inconclusive`` otherwise."""
    if not (math.isfinite(p_value) and math.isfinite(mean)) or p_value >= level:
        return INCONCLUSIVE
    return INTENSIFICATION if mean > 1 else DE_INTENSIFICATION


def ratio_statistics(ratios: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean, t-based confidence interval, one-sample t-test and Wilcoxon signed-rank test of
    ``ratio = 1`` over seeds (NaN ratios dropped)."""
    values = np.asarray([r for r in ratios if math.isfinite(r)], dtype=np.float64)
    n = len(values)
    result = dict(
        mean=math.nan,
        ci_low=math.nan,
        ci_high=math.nan,
        t_statistic=math.nan,
        p_value=math.nan,
        wilcoxon_p_value=math.nan,
    )
    if n == 0:
        return result
    mean = float(values.mean())
    result["mean"] = mean
    if n < 2:
        return result
    # Ratios equal to rounding (e.g. a model compared with itself): no spread to test.
    if float(np.ptp(values)) <= 1e-12:
        result.update(ci_low=mean, ci_high=mean)
        if abs(mean - 1.0) > 1e-12:
            result.update(t_statistic=math.copysign(math.inf, mean - 1), p_value=0.0)
        else:
            result.update(t_statistic=0.0, p_value=1.0, wilcoxon_p_value=1.0)
        return result
    sem = float(values.std(ddof=1) / math.sqrt(n))
    half_width = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sem)
    test = stats.ttest_1samp(values, 1.0)
    result.update(
        ci_low=mean - half_width,
        ci_high=mean + half_width,
        t_statistic=float(test.statistic),
        p_value=float(test.pvalue),
    )
    differences = values - 1.0
    if np.any(differences != 0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # small samples: scipy warns about exactness
            result["wilcoxon_p_value"] = float(stats.wilcoxon(differences).pvalue)
    return result


def _mean(values: Iterable[float]) -> float:
    values = [v for v in values if math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def analyze(
    dense: Mapping[Any, Any],
    pruned: Iterable[Mapping[str, Any]],
    *,
    level: float = 0.05,
    confidence: float = 0.95,
    relative: bool = False,
) -> DistortionAnalysis:
    """The recall-distortion analysis across seeds.

    Args:
        dense: ``{seed: confusion matrix [C, C]}`` of each seed's dense model.
        pruned: records ``{"seed", "criterion", "sparsity", "confusion"}``, one per pruned
            model (a seed's pruned models are compared with that seed's dense model).
        level: significance level of the verdicts.
        confidence: of the confidence intervals.
        relative: use relative gaps ``r / a - 1`` instead of ``r - a``.
    """
    if not 0 < level < 1 or not 0 < confidence < 1:
        raise ValueError(f"level and confidence must lie in (0, 1), got {level} and {confidence}")
    dense_recall = {seed: recall_and_accuracy(cm) for seed, cm in dense.items()}
    dense_gaps = {s: recall_gaps(r, a, relative) for s, (r, a) in dense_recall.items()}
    groups: dict[tuple[str, float], list[tuple[Any, np.ndarray, float, np.ndarray]]] = {}
    for record in pruned:
        seed = record["seed"]
        if seed not in dense_gaps:
            raise KeyError(f"pruned model of seed {seed!r} has no dense model in `dense`")
        recall, accuracy = recall_and_accuracy(record["confusion"])
        if recall.shape != dense_gaps[seed].shape:
            raise ValueError(
                f"seed {seed!r}: pruned confusion has {recall.shape[0]} classes, dense "
                f"{dense_gaps[seed].shape[0]}"
            )
        key = (str(record["criterion"]), float(record["sparsity"]))
        groups.setdefault(key, []).append(
            (seed, recall, accuracy, recall_gaps(recall, accuracy, relative))
        )

    analysis = DistortionAnalysis(level=level, confidence=confidence, relative=relative)
    for (criterion, sparsity), runs in sorted(groups.items()):
        ratios = [intensification_ratio(dense_gaps[seed], gaps) for seed, _, _, gaps in runs]
        statistics = ratio_statistics(ratios, confidence)
        mean_accuracy = _mean(a for _, _, a, _ in runs)
        mean_dense_accuracy = _mean(dense_recall[seed][1] for seed, *_ in runs)
        analysis.summaries.append(
            RatioSummary(
                criterion=criterion,
                sparsity=sparsity,
                n_seeds=len(runs),
                ratios=ratios,
                verdict=verdict(statistics["mean"], statistics["p_value"], level),
                mean_accuracy=mean_accuracy,
                mean_dense_accuracy=mean_dense_accuracy,
                accuracy_change=mean_accuracy - mean_dense_accuracy,
                **statistics,
            )
        )
        dense_matrix = np.stack([dense_gaps[seed] for seed, *_ in runs])
        pruned_matrix = np.stack([gaps for *_, gaps in runs])
        dense_recalls = np.stack([dense_recall[seed][0] for seed, *_ in runs])
        pruned_recalls = np.stack([recall for _, recall, _, _ in runs])
        for c in range(dense_matrix.shape[1]):
            t_statistic, p_value = welch_test(dense_matrix[:, c], pruned_matrix[:, c])
            analysis.class_tests.append(
                ClassGapTest(
                    criterion=criterion,
                    sparsity=sparsity,
                    class_index=c,
                    dense_gap_mean=_mean(dense_matrix[:, c]),
                    pruned_gap_mean=_mean(pruned_matrix[:, c]),
                    dense_recall_mean=_mean(dense_recalls[:, c]),
                    pruned_recall_mean=_mean(pruned_recalls[:, c]),
                    t_statistic=t_statistic,
                    p_value=p_value,
                )
            )
    return analysis


def welch_test(dense: Any, pruned: Any) -> tuple[float, float]:
    """Welch's t-test of two samples (NaN dropped); NaN where either has fewer than two values
    or both are constant."""
    a = _array(dense)
    b = _array(pruned)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) < 2 or len(b) < 2 or (np.ptp(a) == 0 and np.ptp(b) == 0):
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nearly identical samples
        test = stats.ttest_ind(a, b, equal_var=False)
    return float(test.statistic), float(test.pvalue)
