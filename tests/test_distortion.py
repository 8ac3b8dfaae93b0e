"""The recall-distortion analysis on hand-computed cases."""

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from recallprune import distortion as D


def _confusion(correct, per_class=200):
    """A confusion matrix with `correct[c]` hits per class; misses go to the next class."""
    c = len(correct)
    counts = np.zeros((c, c), dtype=np.int64)
    for k, hits in enumerate(correct):
        counts[k, k] = hits
        counts[k, (k + 1) % c] = per_class - hits
    return counts


DENSE = [160, 150, 140, 130]  # recalls .80 .75 .70 .65, accuracy .725, gaps +-.075 +-.025


def test_recall_and_accuracy_by_hand():
    recall, accuracy = D.recall_and_accuracy(torch.tensor(_confusion(DENSE)))
    np.testing.assert_allclose(recall, [0.8, 0.75, 0.7, 0.65])
    assert accuracy == pytest.approx(0.725)
    recall, _ = D.recall_and_accuracy(np.array([[3, 1], [0, 0]]))
    assert math.isnan(recall[1])  # no support


def test_doubled_gaps_give_two_unchanged_give_one_shrinking_below_one():
    dense_r, dense_a = D.recall_and_accuracy(_confusion(DENSE))
    dense_gaps = D.recall_gaps(dense_r, dense_a)
    np.testing.assert_allclose(dense_gaps, [0.075, 0.025, -0.025, -0.075], atol=1e-12)
    for correct, expected in (
        ([175, 155, 135, 115], 2.0),  # gaps doubled, same accuracy
        ([150, 140, 130, 120], 1.0),  # every recall 5 points lower: gaps unchanged
        ([151, 147, 143, 139], 0.4),  # gaps .03 .01 -.01 -.03: shrunk
    ):
        r, a = D.recall_and_accuracy(_confusion(correct))
        gaps = D.recall_gaps(r, a)
        assert D.intensification_ratio(dense_gaps, gaps) == pytest.approx(expected)
        np.testing.assert_allclose(
            D.class_intensification_ratios(dense_gaps, gaps), [expected] * 4, rtol=1e-9
        )


def test_zero_dense_gap_does_not_blow_up():
    dense_gaps = np.array([0.1, 0.0, -0.1])
    pruned_gaps = np.array([0.2, 0.05, -0.2])
    alpha = D.class_intensification_ratios(dense_gaps, pruned_gaps)
    assert alpha[0] == pytest.approx(2) and math.isnan(alpha[1]) and alpha[2] == pytest.approx(2)
    # The model-level ratio weighs that class by d0**2 = 0: still exactly 2.
    assert D.intensification_ratio(dense_gaps, pruned_gaps) == pytest.approx(2.0)
    assert math.isnan(D.intensification_ratio(np.zeros(3), pruned_gaps))
    # A class without support (NaN recall) is left out.
    assert D.intensification_ratio([0.1, np.nan, -0.1], [0.3, 0.5, -0.3]) == pytest.approx(3.0)


def test_relative_gaps():
    gaps = D.recall_gaps([0.9, 0.6], 0.75, relative=True)
    np.testing.assert_allclose(gaps, [0.2, -0.2])


@pytest.mark.parametrize(
    ("ratios", "expected"),
    [
        ([2.0, 2.1, 1.9, 2.05, 1.95], D.INTENSIFICATION),
        ([0.5, 0.55, 0.45, 0.6, 0.52], D.DE_INTENSIFICATION),
        ([1.0, 1.3, 0.8, 0.95, 1.1], D.INCONCLUSIVE),
    ],
)
def test_verdicts_follow_the_p_values(ratios, expected):
    result = D.ratio_statistics(ratios)
    test = stats.ttest_1samp(ratios, 1.0)
    assert result["p_value"] == pytest.approx(test.pvalue)
    assert result["mean"] == pytest.approx(np.mean(ratios))
    half = stats.t.ppf(0.975, len(ratios) - 1) * stats.sem(ratios)
    assert result["ci_low"] == pytest.approx(np.mean(ratios) - half)
    assert result["ci_high"] == pytest.approx(np.mean(ratios) + half)
    assert result["wilcoxon_p_value"] == pytest.approx(
        stats.wilcoxon(np.subtract(ratios, 1)).pvalue
    )
    assert D.verdict(result["mean"], result["p_value"], 0.05) == expected
    # The same data at a stricter level than its p-value is inconclusive.
    assert D.verdict(result["mean"], result["p_value"], result["p_value"] / 2) == D.INCONCLUSIVE


def test_ratio_statistics_degenerate_cases():
    assert math.isnan(D.ratio_statistics([])["mean"])
    one = D.ratio_statistics([1.5])
    assert one["mean"] == 1.5 and math.isnan(one["p_value"])
    constant = D.ratio_statistics([1.0, 1.0, 1.0])
    assert (
        constant["p_value"] == 1.0
        and D.verdict(constant["mean"], constant["p_value"]) == D.INCONCLUSIVE
    )


def test_analyze_end_to_end_and_json():
    generator = np.random.default_rng(0)
    dense, pruned = {}, []
    for seed in range(5):
        jitter = generator.integers(-2, 3, size=4)
        dense[seed] = _confusion(np.array(DENSE) + jitter)
        noise = generator.integers(-3, 4, size=4)  # so that the seeds' ratios differ
        doubled = np.array([175, 155, 135, 115]) + 2 * jitter + noise
        pruned.append(
            {
                "seed": seed,
                "criterion": "magnitude",
                "sparsity": 0.9,
                "confusion": torch.tensor(_confusion(doubled)),
            }
        )
        pruned.append(
            {"seed": seed, "criterion": "control", "sparsity": 0.9, "confusion": dense[seed]}
        )
    analysis = D.analyze(dense, pruned)
    magnitude = analysis.summary("magnitude", 0.9)
    assert magnitude.n_seeds == 5
    assert magnitude.mean == pytest.approx(2.0, abs=0.3)
    assert np.ptp(magnitude.ratios) > 0.01
    assert magnitude.verdict == D.INTENSIFICATION
    assert magnitude.ci_low < magnitude.mean < magnitude.ci_high
    control = analysis.summary("control", 0.9)
    assert control.ratios == pytest.approx([1.0] * 5)
    assert control.verdict == D.INCONCLUSIVE and control.accuracy_change == pytest.approx(0)
    tests = [t for t in analysis.class_tests if t.criterion == "magnitude"]
    assert len(tests) == 4 and tests[0].pruned_gap_mean > tests[0].dense_gap_mean
    assert tests[0].p_value < 0.05
    text = json.dumps(analysis.to_dict(), allow_nan=False)
    assert '"verdict": "intensification"' in text
    with pytest.raises(KeyError, match="no dense model"):
        D.analyze(dense, [{"seed": 99, "criterion": "x", "sparsity": 0.5, "confusion": dense[0]}])
