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
    differences = np.subtract(ratios, 1)
    tied = 0 in differences or len(set(np.abs(differences))) < len(differences)
    method = "asymptotic" if tied else "exact"
    assert result["wilcoxon_p_value"] == pytest.approx(
        stats.wilcoxon(differences, method=method).pvalue
    )
    assert D.verdict(result["mean"], result["p_value"], 0.05) == expected
    # The same data at a stricter level than its p-value is inconclusive.
    assert D.verdict(result["mean"], result["p_value"], result["p_value"] / 2) == D.INCONCLUSIVE


def test_the_wilcoxon_test_with_ties_uses_the_normal_approximation():
    # Twenty seeds with tied ratios: scipy's exact sign-flip enumeration would take minutes.
    ratios = [1.0 + 0.1 * (i % 5) for i in range(20)]
    differences = np.subtract(ratios, 1)
    expected = stats.wilcoxon(differences, method="asymptotic").pvalue
    assert D.ratio_statistics(ratios)["wilcoxon_p_value"] == pytest.approx(expected)
    # Without ties it stays exact.
    distinct = [1.0 + 0.01 * i + 0.001 * i * i for i in range(1, 9)]
    exact = stats.wilcoxon(np.subtract(distinct, 1), method="exact").pvalue
    assert D.ratio_statistics(distinct)["wilcoxon_p_value"] == pytest.approx(exact)


def test_ratio_statistics_degenerate_cases():
    assert math.isnan(D.ratio_statistics([])["mean"])
    one = D.ratio_statistics([1.5])
    assert one["mean"] == 1.5 and math.isnan(one["p_value"])
    # No variation, no test: scipy's t-test gives NaN, whatever the mean (never p = 0).
    for value in (1.0, 1.3):
        constant = D.ratio_statistics([value] * 3)
        assert constant["mean"] == pytest.approx(value) and math.isnan(constant["p_value"])
        assert D.verdict(constant["mean"], constant["p_value"]) == D.INCONCLUSIVE


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


# --- strict inputs -------------------------------------------------------------------------


def _record(seed, criterion="mp", sparsity=0.5, correct=(170, 150, 130, 110)):
    return {
        "seed": seed,
        "criterion": criterion,
        "sparsity": sparsity,
        "confusion": _confusion(correct),
    }


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([[-51, 1], [8, 40]], r"count \[0, 0\] = -51.0 is negative"),
        ([[50.5, 1], [8, 40]], r"count \[0, 0\] = 50.5 is not a whole number"),
        ([[50, np.nan], [8, 40]], r"count \[0, 1\] = nan is not finite"),
        ([[50, 1], [np.inf, 40]], r"count \[1, 0\] = inf is not finite"),
        ([[2.0**60, 1], [8, 40]], r"larger than 2\*\*53"),
        ([[0, 0], [0, 0]], "holds no samples"),
        ([[1, 2, 3], [4, 5, 6]], r"square \[C, C\] matrix"),
    ],
)
def test_bad_counts_are_refused_naming_the_record(bad, message):
    dense = {0: [[50, 1], [8, 40]], 1: [[45, 6], [9, 39]]}
    record = {"seed": 1, "criterion": "mp", "sparsity": 0.5, "confusion": bad}
    with pytest.raises(ValueError, match=message) as error:
        D.analyze(dense, [record])
    assert "pruned record 0 (seed 1, criterion 'mp', sparsity 0.5)" in str(error.value)
    with pytest.raises(ValueError, match="dense model of seed 0"):
        D.analyze({0: bad, 1: dense[1]}, [])


def test_duplicate_records_and_colliding_seeds_are_refused():
    dense = {0: _confusion(DENSE), 1: _confusion([158, 152, 139, 131])}
    # The case that made one model look like two seeds with p = 0.
    twice = [_record(0), _record(0)]
    with pytest.raises(ValueError, match="same seed, criterion and sparsity as pruned record 0"):
        D.analyze(dense, twice)
    with pytest.raises(ValueError, match="seeds 0 and '0' name the same seed"):
        D.analyze({0: dense[0], "0": dense[1]}, [])
    with pytest.raises(ValueError, match="sparsity must lie in"):
        D.analyze(dense, [_record(0, sparsity=1.0)])
    with pytest.raises(ValueError, match="criterion must be a non-empty string"):
        D.analyze(dense, [_record(0, criterion="")])
    with pytest.raises(ValueError, match="missing \\['confusion'\\]"):
        D.analyze(dense, [{"seed": 0, "criterion": "mp", "sparsity": 0.5}])


def test_seeds_are_counted_distinct_and_identical_ratios_are_not_significant():
    dense = {0: _confusion(DENSE), 1: _confusion(DENSE)}
    # Two seeds whose models happen to be identical: ratios without any spread.
    analysis = D.analyze(dense, [_record(0), _record(1)], bootstrap=0)
    summary = analysis.summary("mp", 0.5)
    assert summary.n_seeds == 2 and summary.seeds == [0, 1]
    assert summary.ratios[0] == summary.ratios[1] != 1.0
    assert math.isnan(summary.p_value) and math.isnan(summary.p_adjusted)
    assert summary.verdict == D.INCONCLUSIVE


# --- false-discovery control, the control arm, power and noise -----------------------------


def _by_hand_bh(p):
    """Benjamini-Hochberg written out: p * m / rank, then the running minimum from the top."""
    p = np.asarray(p, dtype=float)
    m = len(p)
    order = np.argsort(p)
    scaled = p[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum.accumulate(scaled[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(adjusted, 1.0)
    return out


def test_adjusted_p_values_match_a_hand_computation_and_skip_nan():
    p = [0.01, 0.04, 0.03, 0.2, 0.5, 0.049]
    np.testing.assert_allclose(D.adjust_p_values(p), _by_hand_bh(p), rtol=1e-12)
    with_nan = D.adjust_p_values([0.01, np.nan, 0.04])
    assert math.isnan(with_nan[1])
    np.testing.assert_allclose(with_nan[[0, 2]], _by_hand_bh([0.01, 0.04]))


def _study_like(ratio_noise, control_noise, seeds=6, seed=0):
    """Dense models and pruned/control records whose gaps are scaled per seed (gaps scaled by
    k give a ratio of exactly k: see the hand cases above)."""
    generator = np.random.default_rng(seed)
    dense, pruned = {}, []
    base = np.array([0.825, 0.755, 0.695, 0.625])  # accuracy .725, gaps .1 .03 -.03 -.1
    for s in range(seeds):
        dense[s] = _confusion((base * 200).round().astype(int))
        for criterion, (scale, noise) in {**ratio_noise, "control": control_noise}.items():
            k = scale + noise * generator.standard_normal()
            recall = 0.725 + k * (base - 0.725)
            pruned.append(
                {
                    "seed": s,
                    "criterion": criterion,
                    "sparsity": 0.5,
                    "confusion": _confusion((recall * 200).round().astype(int)),
                }
            )
    return dense, pruned


def _ratios(dense, pruned, criterion):
    out = []
    for r in pruned:
        if r["criterion"] == criterion:
            gd = D.recall_gaps(*D.recall_and_accuracy(dense[r["seed"]]))
            gp = D.recall_gaps(*D.recall_and_accuracy(r["confusion"]))
            out.append(np.sum(gd * gp) / np.sum(gd**2))
    return np.array(out)


def test_adjustment_flips_a_raw_verdict_and_verdicts_follow_adjusted_p():
    # Among several criteria, one with a modest effect: raw p < 0.05, adjusted p > 0.05.
    dense, pruned = _study_like(
        {"a": (1.25, 0.3), "b": (1.0, 0.3), "c": (1.0, 0.3), "d": (1.0, 0.3)},
        (1.0, 0.3),
        seeds=8,
        seed=11,
    )
    analysis = D.analyze(dense, pruned, bootstrap=0)
    cells = [analysis.summary(c, 0.5) for c in "abcd"]
    raw = [stats.ttest_1samp(_ratios(dense, pruned, c), 1.0).pvalue for c in "abcd"]
    np.testing.assert_allclose([s.p_value for s in cells], raw, rtol=1e-9)
    np.testing.assert_allclose([s.p_adjusted for s in cells], _by_hand_bh(raw), rtol=1e-9)
    flipped = [s for s in cells if s.p_value < 0.05 <= s.p_adjusted]
    assert flipped, [(s.p_value, s.p_adjusted) for s in cells]
    for s in flipped:
        assert D.verdict(s.mean, s.p_value) != D.INCONCLUSIVE  # what raw p would have said
        assert s.verdict == D.INCONCLUSIVE
    # The control arm is its own family: its adjusted p is its raw p (a family of one).
    control = analysis.summary("control", 0.5)
    assert control.p_adjusted == pytest.approx(control.p_value)
    assert control.diff_vs_control is None and control.verdict_vs_control is None


def test_tests_against_the_control_are_paired_by_seed():
    dense, pruned = _study_like({"mp": (1.6, 0.2), "up": (1.05, 0.2)}, (1.0, 0.2), seeds=7)
    analysis = D.analyze(dense, pruned, bootstrap=0)
    control = _ratios(dense, pruned, "control")
    p_values = []
    for criterion in ("mp", "up"):
        summary = analysis.summary(criterion, 0.5)
        ratios = _ratios(dense, pruned, criterion)
        differences = ratios - control
        paired = stats.ttest_rel(ratios, control)
        half = stats.t.ppf(0.975, 6) * stats.sem(differences)
        assert summary.diff_vs_control == pytest.approx(differences.mean())
        assert summary.diff_vs_control_ci_low == pytest.approx(differences.mean() - half)
        assert summary.diff_vs_control_ci_high == pytest.approx(differences.mean() + half)
        assert summary.p_vs_control == pytest.approx(paired.pvalue)
        p_values.append(paired.pvalue)
    adjusted = _by_hand_bh(p_values)
    mp, up = analysis.summary("mp", 0.5), analysis.summary("up", 0.5)
    assert [mp.p_vs_control_adjusted, up.p_vs_control_adjusted] == pytest.approx(adjusted)
    assert mp.verdict_vs_control == D.MORE_THAN_CONTROL
    assert up.verdict_vs_control == D.INCONCLUSIVE
    # Without a control arm the fields are None, not zeros.
    no_control = D.analyze(dense, [r for r in pruned if r["criterion"] != "control"], bootstrap=0)
    assert no_control.control is None
    assert no_control.summary("mp", 0.5).to_dict()["p_vs_control"] is None


def test_min_detectable_effect_matches_statsmodels():
    power = pytest.importorskip("statsmodels.stats.power")
    for n in (2, 3, 5, 10, 30):
        for level in (0.05, 0.01) if n > 2 else ():  # statsmodels' power is NaN at n = 2
            effect = D.min_detectable_effect(0.37, n, level)
            # statsmodels' power at that effect (in units of the standard deviation) is 0.8.
            achieved = power.TTestPower().power(effect / 0.37, n, level, alternative="two-sided")
            assert achieved == pytest.approx(0.8, abs=1e-9)
        # And its solver agrees where it converges (it stops at a bound for tiny n and level).
        d = power.TTestPower().solve_power(nobs=n, alpha=0.05, power=0.8)
        assert D.min_detectable_effect(0.37, n) == pytest.approx(0.37 * d, rel=1e-5)
    assert math.isnan(D.min_detectable_effect(0.37, 1))
    # seeds_needed is the smallest n whose detectable effect reaches the effect.
    n = D.seeds_needed(0.3, 0.5)
    assert D.min_detectable_effect(0.5, n) <= 0.3 < D.min_detectable_effect(0.5, n - 1)


def _expanded_labels(row, c):
    """One label per test sample of true class c, correct ones first, then the others."""
    order = [c, *[k for k in range(len(row)) if k != c]]
    return np.repeat(order, np.asarray(row, dtype=int)[order])


def test_test_set_bootstrap_against_a_per_sample_resampling():
    dense = _confusion([160, 150, 140, 130])
    dense[0, 2], dense[0, 1] = 10, 30  # errors spread over two classes
    pruned = _confusion([170, 140, 150, 110])
    replicates = 4000
    d_boot, p_boot = D.resample_confusion_pair(dense, pruned, replicates, np.random.default_rng(1))
    # Row sums (each class's test samples) are kept in every replicate.
    np.testing.assert_array_equal(d_boot.sum(axis=2), np.broadcast_to(dense.sum(1), (4000, 4)))
    np.testing.assert_array_equal(p_boot.sum(axis=2), np.broadcast_to(pruned.sum(1), (4000, 4)))
    # The same distribution as resampling the matched test samples one by one.
    generator = np.random.default_rng(2)
    per_sample = []
    for _ in range(replicates):
        d, p = np.zeros((4, 4)), np.zeros((4, 4))
        for c in range(4):
            dl, pl = _expanded_labels(dense[c], c), _expanded_labels(pruned[c], c)
            pick = generator.integers(0, len(dl), len(dl))
            np.add.at(d[c], dl[pick], 1)
            np.add.at(p[c], pl[pick], 1)
        gd = D.recall_gaps(*D.recall_and_accuracy(d))
        gp = D.recall_gaps(*D.recall_and_accuracy(p))
        per_sample.append(np.sum(gd * gp) / np.sum(gd**2))
    sd = D.measurement_sd(dense, pruned, replicates, np.random.default_rng(1))
    assert sd == pytest.approx(np.std(per_sample, ddof=1), rel=0.06)
    assert np.mean(d_boot[:, 0, 0]) == pytest.approx(160, rel=0.01)
    # A model compared with itself resamples to itself: no measurement noise on ratio 1.
    assert D.measurement_sd(dense, dense, 50, np.random.default_rng(0)) == 0.0
    with pytest.raises(ValueError, match="not the same test set"):
        D.resample_confusion_pair(dense, _confusion([160, 150, 140, 130], 201), 2, None)
