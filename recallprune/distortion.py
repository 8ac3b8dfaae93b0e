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

Across seeds, each a dense model and its pruned descendants, per cell (criterion, sparsity):

- the mean of ``alpha[t]``, a t-interval, a one-sample t-test of ``alpha[t] = 1`` and a
  Wilcoxon signed-rank test; a cell whose ratios do not vary has no t-test (p is NaN);
- against the control arm (the same retraining with nothing pruned, at the same round and
  seed): the paired differences ``alpha_criterion - alpha_control``, their mean, interval and
  paired t-test; this separates what pruning does from what retraining and regression to the
  mean do;
- the smallest difference from 1 that the seeds could have detected (two-sided t-test at the
  chosen level, power 0.8, from the seeds' spread), and the ratio's spread under resampling of
  the test set (``measurement_sd``), so that an inconclusive cell says what would help;
- every family of tests corrected for multiple comparisons with Benjamini-Hochberg: the ratio
  tests of the pruning criteria's cells with sparsity > 0; those of the control arm; the tests
  against the control; the per-class Welch tests (gaps, dense against pruned) of one sparsity.
  Verdicts come from the adjusted p-values.

Inputs are checked strictly: counts must be non-negative whole numbers, seeds distinct, and a
(seed, criterion, sparsity) given once. Everything takes tensors or numpy arrays and returns
plain data (dataclasses with ``to_dict()`` that serialise to JSON; NaN becomes ``None``).
"""

from __future__ import annotations

import functools
import math
import warnings
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import optimize, stats

INTENSIFICATION = "intensification"
DE_INTENSIFICATION = "de-intensification"
INCONCLUSIVE = "inconclusive"
MORE_THAN_CONTROL = "more distortion than retraining alone"
LESS_THAN_CONTROL = "less distortion than retraining alone"
CONTROL = "control"  # the default name of the control arm

POWER = 0.8  # of the minimum detectable effect
# Counts above this are not exact in float64, which the statistics use.
MAX_COUNT = 2**53


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


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as None and numpy scalars as Python numbers, for
    ``json.dumps(..., allow_nan=False)``."""
    return _to_json(value)


def check_confusion(confusion: Any, what: str = "confusion") -> np.ndarray:
    """The counts of a ``[C, C]`` confusion matrix as float64, refused with an error naming
    ``what`` unless they are finite, non-negative whole numbers (at most 2**53) and at least
    one sample."""
    counts = _array(confusion)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] < 2:
        raise ValueError(
            f"{what}: expected a square [C, C] matrix with C >= 2, got shape {counts.shape}"
        )
    problems = (
        (~np.isfinite(counts), "not finite"),
        (counts < 0, "negative"),
        (counts != np.round(counts), "not a whole number"),
        (counts > MAX_COUNT, f"larger than 2**53 ({MAX_COUNT})"),
    )
    for bad, why in problems:
        with np.errstate(invalid="ignore"):
            if np.any(bad):
                row, col = np.argwhere(bad)[0]
                raise ValueError(
                    f"{what}: counts must be non-negative whole numbers; count [{row}, {col}] "
                    f"= {float(counts[row, col])!r} is {why}"
                )
    if counts.sum() == 0:
        raise ValueError(f"{what}: the matrix holds no samples (all counts are 0)")
    return counts


def recall_and_accuracy(confusion: Any, what: str = "confusion") -> tuple[np.ndarray, float]:
    """Per-class recall (NaN without support) and accuracy of a ``[C, C]`` confusion matrix
    (rows: true class), checked with :func:`check_confusion`."""
    counts = check_confusion(confusion, what)
    support = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.diag(counts) / support
    return recall, float(np.trace(counts) / counts.sum())


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
    return float(_batched_ratio(dense, pruned))


def _batched_ratio(dense: np.ndarray, pruned: np.ndarray) -> np.ndarray:
    """:func:`intensification_ratio` over the leading dimensions of ``[..., C]`` gaps."""
    finite = np.isfinite(dense) & np.isfinite(pruned)
    dense = np.where(finite, dense, 0.0)
    pruned = np.where(finite, pruned, 0.0)
    denominator = np.sum(dense**2, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator == 0, np.nan, np.sum(dense * pruned, axis=-1) / denominator)


@dataclass
class RatioSummary:
    """The model-level ratio of one (criterion, sparsity) across seeds.

    ``p_value`` tests ``ratio = 1``; ``p_adjusted`` is its Benjamini-Hochberg adjustment within
    its family, and ``verdict`` follows it. The ``*_vs_control`` fields compare the ratio with
    the control arm's at the same seed and round (``None`` without a control arm, and for the
    control itself). ``min_detectable_effect``: the smallest ``|mean - 1|`` that a two-sided
    t-test at the analysis level would find with power 0.8 given these seeds' spread;
    ``measurement_sd``: the ratio's standard deviation under resampling of the test set
    (root mean square over the cell's runs)."""

    criterion: str
    sparsity: float
    n_seeds: int
    seeds: list[Any]
    ratios: list[float]
    mean: float
    sd: float
    ci_low: float
    ci_high: float
    t_statistic: float
    p_value: float
    p_adjusted: float
    wilcoxon_p_value: float
    verdict: str
    diff_vs_control: float | None
    diff_vs_control_ci_low: float | None
    diff_vs_control_ci_high: float | None
    p_vs_control: float | None
    p_vs_control_adjusted: float | None
    verdict_vs_control: str | None
    min_detectable_effect: float
    measurement_sd: float
    mean_accuracy: float
    mean_dense_accuracy: float
    accuracy_change: float

    def to_dict(self) -> dict[str, Any]:
        return _to_json(asdict(self))


@dataclass
class ClassGapTest:
    """Welch's t-test of one class's gap, dense against pruned, across seeds; ``p_adjusted``
    is adjusted over all classes and criteria at the same sparsity."""

    criterion: str
    sparsity: float
    class_index: int
    dense_gap_mean: float
    pruned_gap_mean: float
    dense_recall_mean: float
    pruned_recall_mean: float
    t_statistic: float
    p_value: float
    p_adjusted: float

    def to_dict(self) -> dict[str, Any]:
        return _to_json(asdict(self))


@dataclass
class DistortionAnalysis:
    """Everything :func:`analyze` finds: a summary per (criterion, sparsity) and the per-class
    tests."""

    level: float
    confidence: float
    relative: bool
    control: str | None = None
    bootstrap: int = 0
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
            "control": self.control,
            "bootstrap": self.bootstrap,
            "summaries": [s.to_dict() for s in self.summaries],
            "class_tests": [t.to_dict() for t in self.class_tests],
        }


def verdict(mean: float, p_value: float, level: float = 0.05) -> str:
    """``intensification`` / ``de-intensification`` where the test rejects ``alpha = 1`` at
    ``level`` (pass the adjusted p-value), in the direction of the mean; ``inconclusive``
    otherwise, a NaN p-value included."""
    if not (math.isfinite(p_value) and math.isfinite(mean)) or p_value >= level:
        return INCONCLUSIVE
    return INTENSIFICATION if mean > 1 else DE_INTENSIFICATION


def verdict_vs_control(mean_difference: float, p_value: float, level: float = 0.05) -> str:
    """More or less distortion (a larger or smaller ratio) than the control arm, where the
    paired test rejects a zero difference at ``level``; ``inconclusive`` otherwise."""
    if not (math.isfinite(p_value) and math.isfinite(mean_difference)) or p_value >= level:
        return INCONCLUSIVE
    return MORE_THAN_CONTROL if mean_difference > 0 else LESS_THAN_CONTROL


def mean_statistics(
    values: Sequence[float], null: float = 0.0, confidence: float = 0.95
) -> dict[str, float]:
    """Mean, sample standard deviation, t-interval and one-sample t-test of ``mean = null``
    over the finite values. Values that do not vary at all have no t statistic (it would
    divide by a zero spread; scipy returns p = 0 there unless the mean is the null): their
    p-value is NaN, so that a model counted twice, say, is never "significant"."""
    values = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    n = len(values)
    result = dict(
        mean=math.nan, sd=math.nan, ci_low=math.nan, ci_high=math.nan, t_statistic=math.nan
    )
    result["p_value"] = math.nan
    if n == 0:
        return result
    result["mean"] = float(values.mean())
    if n < 2:
        return result
    sd = float(values.std(ddof=1))
    half_width = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n))
    result.update(sd=sd, ci_low=result["mean"] - half_width, ci_high=result["mean"] + half_width)
    if np.ptp(values) > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # nearly identical values
            test = stats.ttest_1samp(values, null)
        result.update(t_statistic=float(test.statistic), p_value=float(test.pvalue))
    return result


def ratio_statistics(ratios: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """:func:`mean_statistics` of ``ratio = 1`` over seeds (NaN ratios dropped), with a
    Wilcoxon signed-rank test beside the t-test."""
    result = mean_statistics(ratios, 1.0, confidence)
    differences = np.asarray([r - 1.0 for r in ratios if math.isfinite(r)])
    result["wilcoxon_p_value"] = math.nan
    if len(differences) >= 2 and np.any(differences != 0):
        # Exact without ties or zeros; with them the normal approximation with its tie
        # correction, as R's wilcox.test does: scipy's exact sign-flip enumeration there
        # costs 2**n statistics (two minutes at 20 seeds).
        magnitudes = np.abs(differences)
        tied = np.any(magnitudes == 0) or len(np.unique(magnitudes)) < len(magnitudes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # small samples: scipy warns about exactness
            test = stats.wilcoxon(differences, method="asymptotic" if tied else "auto")
            result["wilcoxon_p_value"] = float(test.pvalue)
    return result


def adjust_p_values(p_values: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values of one family of tests; NaN entries (no test)
    stay NaN and do not count towards the family's size."""
    p = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full(p.shape, np.nan)
    finite = np.isfinite(p)
    if finite.any():
        adjusted[finite] = stats.false_discovery_control(p[finite], method="bh")
    return adjusted


def min_detectable_effect(sd: float, n: int, level: float = 0.05, power: float = POWER) -> float:
    """The smallest true difference from the null that a two-sided one-sample t-test of ``n``
    values with standard deviation ``sd`` rejects at ``level`` with probability ``power``
    (exact, from the noncentral t distribution); NaN below two values."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    return _standardised_effect(n, level, power) * sd


@functools.lru_cache(maxsize=4096)
def _standardised_effect(n: int, level: float, power: float) -> float:
    df = n - 1
    critical = stats.t.ppf(1 - level / 2, df)

    def shortfall(effect: float) -> float:
        shift = effect * math.sqrt(n)
        # The far tail underflows to NaN in scipy for large shifts, where it is ~0.
        far_tail = float(np.nan_to_num(stats.nct.cdf(-critical, df, shift)))
        achieved = stats.nct.sf(critical, df, shift) + far_tail
        return achieved - power

    upper = 1.0
    while shortfall(upper) < 0:
        upper *= 2
    return float(optimize.brentq(shortfall, 0.0, upper, xtol=1e-10))


def seeds_needed(
    effect: float, sd: float, level: float = 0.05, power: float = POWER, limit: int = 1000
) -> int | None:
    """The fewest seeds whose :func:`min_detectable_effect` reaches ``|effect|``; None when
    more than ``limit`` would be needed (or the effect is zero)."""
    if not (math.isfinite(effect) and math.isfinite(sd)) or effect == 0:
        return None
    if sd == 0:
        return 2
    low, high = 2, limit
    if min_detectable_effect(sd, high, level, power) > abs(effect):
        return None
    while low < high:  # the detectable effect shrinks as seeds are added
        middle = (low + high) // 2
        if min_detectable_effect(sd, middle, level, power) <= abs(effect):
            high = middle
        else:
            low = middle + 1
    return low


def bootstrap_seed(seed: Any, criterion: str, sparsity: float, base: int = 0) -> list[int]:
    """The generator seed of one run's test-set resampling: fixed by the run's identity, so
    that every run's resamples can be recomputed alone and in any order (the sparsity enters
    to 9 decimals)."""
    return [base, zlib.crc32(f"{seed!r}|{criterion}|{float(sparsity):.9f}".encode())]


def resample_confusion_pair(
    dense: Any, pruned: Any, replicates: int, generator: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Test-set bootstrap of a dense model's and a pruned model's confusion matrices on the
    same test set: ``replicates`` matrices of each, ``[replicates, C, C]``.

    Within each true class the class's samples are drawn with replacement (a multinomial draw
    of the row's count). Counts alone do not say which samples each model gets right, so the
    two models' samples are matched as closely as the counts allow: in a row, both models'
    correct predictions come first, then their errors in the order of the predicted class;
    the row is cut into the segments where both models' labels are constant, and one
    multinomial draw over the segments resamples both matrices at once. A model compared
    with itself therefore resamples to identical matrices."""
    dense = check_confusion(dense, "dense confusion")
    pruned = check_confusion(pruned, "pruned confusion")
    if dense.shape != pruned.shape:
        raise ValueError(f"confusion shapes differ: dense {dense.shape}, pruned {pruned.shape}")
    classes = dense.shape[0]
    dense_out = np.zeros((replicates, classes, classes))
    pruned_out = np.zeros((replicates, classes, classes))
    for c in range(classes):
        order = [c, *[k for k in range(classes) if k != c]]
        dense_edges = np.cumsum(dense[c, order])
        pruned_edges = np.cumsum(pruned[c, order])
        total = dense_edges[-1]
        if total != pruned_edges[-1]:
            raise ValueError(
                f"class {c} has {int(total)} test samples in the dense matrix and "
                f"{int(pruned_edges[-1])} in the pruned one: not the same test set"
            )
        if total == 0:
            continue
        edges = np.union1d(dense_edges, pruned_edges)
        edges = edges[edges > 0]
        sizes = np.diff(edges, prepend=0.0)
        # The label each model gives the segment ending at each edge.
        dense_label = np.asarray(order)[np.searchsorted(dense_edges, edges, side="left")]
        pruned_label = np.asarray(order)[np.searchsorted(pruned_edges, edges, side="left")]
        draws = generator.multinomial(int(total), sizes / total, size=replicates)
        np.add.at(dense_out, (slice(None), c, dense_label), draws)
        np.add.at(pruned_out, (slice(None), c, pruned_label), draws)
    return dense_out, pruned_out


def measurement_sd(
    dense: Any,
    pruned: Any,
    replicates: int,
    generator: np.random.Generator,
    relative: bool = False,
) -> float:
    """Standard deviation of one run's model-level ratio over :func:`resample_confusion_pair`
    replicates (NaN replicates, e.g. a class resampled to no support, use the classes left)."""
    if replicates < 2:
        return math.nan
    dense_b, pruned_b = resample_confusion_pair(dense, pruned, replicates, generator)
    ratios = _batched_ratio(_gaps_of(dense_b, relative), _gaps_of(pruned_b, relative))
    ratios = ratios[np.isfinite(ratios)]
    return float(np.std(ratios, ddof=1)) if len(ratios) >= 2 else math.nan


def _gaps_of(counts: np.ndarray, relative: bool) -> np.ndarray:
    """Gaps of a stack ``[..., C, C]`` of confusion matrices."""
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.diagonal(counts, axis1=-2, axis2=-1) / counts.sum(axis=-1)
        accuracy = np.trace(counts, axis1=-2, axis2=-1) / counts.sum(axis=(-2, -1))
    return recall_gaps(recall, accuracy, relative)


def _mean(values: Iterable[float]) -> float:
    values = [v for v in values if math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def root_mean_square(values: Iterable[float]) -> float:
    """Root mean square of the finite values (NaN if none): the pooled standard deviation of
    noises of equal weight, such as the runs' measurement noise in one cell."""
    values = [v for v in values if math.isfinite(v)]
    return math.sqrt(float(np.mean(np.square(values)))) if values else math.nan


def _seed_label(seed: Any) -> str:
    return repr(seed)


def _check_inputs(
    dense: Mapping[Any, Any], pruned: Iterable[Mapping[str, Any]]
) -> tuple[dict[Any, np.ndarray], list[tuple[Any, str, float, np.ndarray]]]:
    """The dense matrices and the records, each checked; errors name the record."""
    if not isinstance(dense, Mapping) or not dense:
        raise ValueError("dense: expected a non-empty mapping {seed: confusion matrix}")
    by_text: dict[str, Any] = {}
    for seed in dense:
        text = str(seed).strip().lstrip("0") or "0"
        if text in by_text:
            raise ValueError(
                f"dense: seeds {by_text[text]!r} and {seed!r} name the same seed; give each "
                "seed once"
            )
        by_text[text] = seed
    dense_counts = {
        seed: check_confusion(cm, f"dense model of seed {seed!r}") for seed, cm in dense.items()
    }
    shapes = {cm.shape for cm in dense_counts.values()}
    if len(shapes) > 1:
        raise ValueError(f"dense: the seeds' matrices differ in shape: {sorted(shapes)}")
    records = []
    seen: dict[tuple[Any, str, float], int] = {}
    for index, record in enumerate(pruned):
        where = f"pruned record {index}"
        if not isinstance(record, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {type(record).__name__}")
        missing = [k for k in ("seed", "criterion", "sparsity", "confusion") if k not in record]
        if missing:
            raise ValueError(f"{where}: missing {missing}")
        seed, criterion, sparsity = record["seed"], record["criterion"], record["sparsity"]
        where = f"{where} (seed {seed!r}, criterion {criterion!r}, sparsity {sparsity!r})"
        if not isinstance(criterion, str) or not criterion:
            raise ValueError(f"{where}: criterion must be a non-empty string")
        if isinstance(sparsity, bool) or not isinstance(sparsity, int | float | np.number):
            raise ValueError(f"{where}: sparsity must be a number in [0, 1)")
        sparsity = float(sparsity)
        if not 0 <= sparsity < 1:
            raise ValueError(f"{where}: sparsity must lie in [0, 1)")
        if seed not in dense_counts:
            raise KeyError(f"{where}: pruned model of seed {seed!r} has no dense model in `dense`")
        key = (seed, criterion, round(sparsity, 9))
        if key in seen:
            raise ValueError(
                f"{where}: the same seed, criterion and sparsity as pruned record {seen[key]}; "
                "each model is counted once (two seeds would be one seed twice)"
            )
        seen[key] = index
        counts = check_confusion(record["confusion"], where)
        if counts.shape != dense_counts[seed].shape:
            raise ValueError(
                f"{where}: {counts.shape[0]} classes, but the dense model of seed {seed!r} has "
                f"{dense_counts[seed].shape[0]}"
            )
        records.append((seed, criterion, sparsity, counts))
    return dense_counts, records


def analyze(
    dense: Mapping[Any, Any],
    pruned: Iterable[Mapping[str, Any]],
    *,
    level: float = 0.05,
    confidence: float = 0.95,
    relative: bool = False,
    control: str | None = CONTROL,
    bootstrap: int = 200,
    bootstrap_base_seed: int = 0,
) -> DistortionAnalysis:
    """The recall-distortion analysis across seeds.

    Args:
        dense: ``{seed: confusion matrix [C, C]}`` of each seed's dense model.
        pruned: records ``{"seed", "criterion", "sparsity", "confusion"}``, one per pruned
            model (a seed's pruned models are compared with that seed's dense model; a
            (seed, criterion, sparsity) may appear once).
        level: significance level of the verdicts (on Benjamini-Hochberg adjusted p-values).
        confidence: of the confidence intervals.
        relative: use relative gaps ``r / a - 1`` instead of ``r - a``.
        control: the criterion name of the control arm (the same retraining, nothing
            pruned), if the records hold one; every other criterion is compared with it
            at the same seed and sparsity. None: no control arm.
        bootstrap: test-set resamples per run for ``measurement_sd`` (0: skip).
        bootstrap_base_seed: the resampling's base seed (see :func:`bootstrap_seed`).
    """
    if not 0 < level < 1 or not 0 < confidence < 1:
        raise ValueError(f"level and confidence must lie in (0, 1), got {level} and {confidence}")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise ValueError(f"bootstrap must be a non-negative integer, got {bootstrap!r}")
    dense_counts, records = _check_inputs(dense, pruned)
    dense_recall = {
        seed: recall_and_accuracy(cm, f"dense model of seed {seed!r}")
        for seed, cm in dense_counts.items()
    }
    dense_gaps = {s: recall_gaps(r, a, relative) for s, (r, a) in dense_recall.items()}
    groups: dict[tuple[str, float], list[tuple[Any, np.ndarray, float, np.ndarray, float]]] = {}
    for seed, criterion, sparsity, counts in records:
        recall, accuracy = recall_and_accuracy(counts)
        noise = math.nan
        if bootstrap:
            generator = np.random.default_rng(
                bootstrap_seed(seed, criterion, sparsity, bootstrap_base_seed)
            )
            noise = measurement_sd(dense_counts[seed], counts, bootstrap, generator, relative)
        groups.setdefault((criterion, sparsity), []).append(
            (seed, recall, accuracy, recall_gaps(recall, accuracy, relative), noise)
        )

    analysis = DistortionAnalysis(
        level=level,
        confidence=confidence,
        relative=relative,
        control=control if any(c == control for c, _ in groups) else None,
        bootstrap=bootstrap,
    )
    ratios_by_cell = {
        key: {seed: intensification_ratio(dense_gaps[seed], gaps) for seed, _, _, gaps, _ in runs}
        for key, runs in groups.items()
    }
    for (criterion, sparsity), runs in sorted(groups.items()):
        ratios = ratios_by_cell[(criterion, sparsity)]
        statistics = ratio_statistics(list(ratios.values()), confidence)
        paired = _vs_control(
            ratios, ratios_by_cell.get((analysis.control, sparsity)), criterion, analysis.control
        )
        if paired is not None:
            paired = mean_statistics(paired, 0.0, confidence)
        noises = [noise for *_, noise in runs if math.isfinite(noise)]
        mean_accuracy = _mean(a for _, _, a, _, _ in runs)
        mean_dense_accuracy = _mean(dense_recall[seed][1] for seed, *_ in runs)
        analysis.summaries.append(
            RatioSummary(
                criterion=criterion,
                sparsity=sparsity,
                n_seeds=len(ratios),
                seeds=list(ratios),
                ratios=list(ratios.values()),
                p_adjusted=math.nan,
                verdict=INCONCLUSIVE,
                diff_vs_control=None if paired is None else paired["mean"],
                diff_vs_control_ci_low=None if paired is None else paired["ci_low"],
                diff_vs_control_ci_high=None if paired is None else paired["ci_high"],
                p_vs_control=None if paired is None else paired["p_value"],
                p_vs_control_adjusted=None,
                verdict_vs_control=None,
                min_detectable_effect=min_detectable_effect(statistics["sd"], len(ratios), level),
                measurement_sd=root_mean_square(noises),
                mean_accuracy=mean_accuracy,
                mean_dense_accuracy=mean_dense_accuracy,
                accuracy_change=mean_accuracy - mean_dense_accuracy,
                **statistics,
            )
        )
        _class_tests(analysis, criterion, sparsity, runs, dense_gaps, dense_recall)
    _adjust(analysis)
    return analysis


def _vs_control(
    ratios: dict[Any, float],
    control_ratios: dict[Any, float] | None,
    criterion: str,
    control: str | None,
) -> list[float] | None:
    """The paired differences criterion - control over the seeds both have; None for the
    control itself or where there is no control cell."""
    if control is None or criterion == control or control_ratios is None:
        return None
    return [ratios[s] - control_ratios[s] for s in ratios if s in control_ratios]


def _class_tests(analysis, criterion, sparsity, runs, dense_gaps, dense_recall) -> None:
    dense_matrix = np.stack([dense_gaps[seed] for seed, *_ in runs])
    pruned_matrix = np.stack([gaps for _, _, _, gaps, _ in runs])
    dense_recalls = np.stack([dense_recall[seed][0] for seed, *_ in runs])
    pruned_recalls = np.stack([recall for _, recall, _, _, _ in runs])
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
                p_adjusted=math.nan,
            )
        )


def _adjust(analysis: DistortionAnalysis) -> None:
    """Benjamini-Hochberg within each family, then the verdicts from the adjusted p-values.
    Families: the ratio tests of pruning criteria at sparsity > 0; those of the control arm;
    the tests against the control; the class tests of each sparsity."""
    pruned = [s for s in analysis.summaries if s.sparsity > 0]
    criteria = [s for s in pruned if s.criterion != analysis.control]
    controls = [s for s in pruned if s.criterion == analysis.control]
    for family in (criteria, controls):
        for s, p in zip(family, adjust_p_values([s.p_value for s in family]), strict=True):
            s.p_adjusted = float(p)
    for s in analysis.summaries:
        s.verdict = verdict(s.mean, s.p_adjusted, analysis.level)
    for s in analysis.summaries:
        if s.p_vs_control is not None:  # sparsity 0 stays untested: nothing was pruned
            s.p_vs_control_adjusted, s.verdict_vs_control = math.nan, INCONCLUSIVE
    paired = [s for s in criteria if s.p_vs_control is not None]
    for s, p in zip(paired, adjust_p_values([s.p_vs_control for s in paired]), strict=True):
        s.p_vs_control_adjusted = float(p)
        s.verdict_vs_control = verdict_vs_control(s.diff_vs_control, float(p), analysis.level)
    by_sparsity: dict[float, list[ClassGapTest]] = {}
    for t in analysis.class_tests:
        if t.sparsity > 0:
            by_sparsity.setdefault(round(t.sparsity, 9), []).append(t)
    for family in by_sparsity.values():
        for t, p in zip(family, adjust_p_values([t.p_value for t in family]), strict=True):
            t.p_adjusted = float(p)


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
