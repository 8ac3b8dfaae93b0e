"""``recallprune compare``: the pooled rows, the regression with clustered standard errors
(checked against numpy and a hand-written sandwich estimator), and the refusals."""

import csv
import json
import re

import numpy as np
import pytest
from scipy import stats

from recallprune.study import StudyError
from recallprune.study import compare as C

pytest.importorskip("statsmodels")

SPARSITIES = [0.2, 0.36, 0.488, 0.59, 0.672, 0.738, 0.79, 0.832, 0.866]


def _fake_study(
    folder,
    dense_error,
    params,
    generator,
    seeds=4,
    criteria=("magnitude", "undecayed"),
    num_classes=10,
    effect=None,
):
    """A results.json as a study writes it, whose ratios follow a known linear model."""
    effect = effect or {"magnitude": 0.0, "undecayed": 0.1, "control": -0.2}
    summaries = []
    runs = [
        {
            "seed": seed,
            "criterion": "dense",
            "round": 0,
            "accuracy": 1 - dense_error,
            "recall": [0.9] * num_classes,
        }
        for seed in range(seeds)
    ]
    for criterion in [*criteria, "control"]:
        for sparsity in SPARSITIES:
            ratios = [
                1.0
                + effect[criterion]
                + 0.8 * sparsity
                + 3.0 * dense_error
                - 0.05 * np.log2(params)
                + 0.1 * generator.standard_normal()
                + 0.05 * seed  # seed-level clustering
                for seed in range(seeds)
            ]
            summaries.append(
                {
                    "criterion": criterion,
                    "sparsity": sparsity,
                    "seeds": list(range(seeds)),
                    "ratios": ratios,
                }
            )
        summaries.append(
            {
                "criterion": criterion,
                "sparsity": 0.0,
                "seeds": list(range(seeds)),
                "ratios": [1.0] * seeds,
            }
        )
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(
        json.dumps(
            {
                "config": {
                    "criteria": list(criteria),
                    "params": params,
                    "dataset": "digits",
                    "model": "mlp",
                },
                "runs": runs,
                "analysis": {"summaries": summaries},
            }
        )
    )
    return folder


@pytest.fixture
def sweep(tmp_path):
    generator = np.random.default_rng(0)
    folders = []
    for error in (0.02, 0.1, 0.3):
        for params in (10_000, 80_000):
            folders.append(_fake_study(tmp_path / f"e{error}-p{params}", error, params, generator))
    return folders


def _sandwich(x, y, groups):
    """OLS with the cluster-robust (CR1) covariance, written out."""
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    residual = y - x @ beta
    bread = np.linalg.inv(x.T @ x)
    meat = np.zeros((x.shape[1], x.shape[1]))
    for g in np.unique(groups):
        score = x[groups == g].T @ residual[groups == g]
        meat += np.outer(score, score)
    n, k, clusters = len(y), x.shape[1], len(np.unique(groups))
    correction = clusters / (clusters - 1) * (n - 1) / (n - k)
    return beta, np.sqrt(np.diag(correction * bread @ meat @ bread)), clusters


def test_regression_against_numpy_and_a_hand_written_sandwich(sweep, tmp_path):
    result = C.compare(sweep)
    C.write_compare(result, tmp_path / "out")
    with open(tmp_path / "out" / "compare.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(C.CSV_FIELDS)
    assert len(rows) == 6 * 3 * len(SPARSITIES) * 4  # studies x arms x levels x seeds
    assert all(float(r["sparsity"]) > 0 for r in rows)
    for criterion in ("magnitude", "undecayed", "control"):
        subset = [r for r in rows if r["criterion"] == criterion]
        x = np.column_stack(
            [
                np.ones(len(subset)),
                [float(r["sparsity"]) for r in subset],
                [float(r["dense_error"]) for r in subset],
                np.log2([float(r["params"]) for r in subset]),
            ]
        )
        y = np.array([float(r["ratio"]) for r in subset])
        groups = np.array([f"{r['study']}|{r['seed']}" for r in subset])
        beta, se, clusters = _sandwich(x, y, groups)
        fitted = {c["term"]: c for c in result["coefficients"] if c["criterion"] == criterion}
        assert list(fitted) == list(C.TERMS)
        for i, term in enumerate(C.TERMS):
            assert fitted[term]["estimate"] == pytest.approx(beta[i], rel=1e-9, abs=1e-12)
            assert fitted[term]["std_error"] == pytest.approx(se[i], rel=1e-6)
            t = beta[i] / se[i]
            assert fitted[term]["p_value"] == pytest.approx(
                2 * stats.t.sf(abs(t), clusters - 1), rel=1e-6
            )
            half = stats.t.ppf(0.975, clusters - 1) * se[i]
            assert fitted[term]["ci_low"] == pytest.approx(beta[i] - half, rel=1e-6)
        # The simulated slopes are recovered.
        assert fitted["sparsity"]["ci_low"] < 0.8 < fitted["sparsity"]["ci_high"]
        assert fitted["dense_error"]["ci_low"] < 3.0 < fitted["dense_error"]["ci_high"]
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert {"criterion", "term", "estimate", "ci_low", "ci_high", "p_value"} <= set(
        saved["coefficients"][0]
    )
    report = (tmp_path / "out" / "compare.md").read_text()
    assert "stronger on more difficult tasks?** magnitude: yes" in report
    assert (tmp_path / "out" / "compare.png").is_file()


def test_clustered_errors_against_statsmodels_directly(sweep):
    import pandas as pd
    import statsmodels.formula.api as smf

    result = C.compare(sweep)
    frame = pd.DataFrame(result["rows"])
    frame = frame[frame["criterion"] == "undecayed"].copy()
    frame["log2_params"] = np.log2(frame["params"].astype(float))
    frame["cluster"] = pd.factorize(frame["study"] + "|" + frame["seed"].astype(str))[0]
    direct = smf.ols("ratio ~ sparsity + dense_error + log2_params", frame).fit(
        cov_type="cluster", cov_kwds={"groups": frame["cluster"]}, use_t=True
    )
    fitted = {c["term"]: c for c in result["coefficients"] if c["criterion"] == "undecayed"}
    for term, name in zip(
        C.TERMS, ["Intercept", "sparsity", "dense_error", "log2_params"], strict=True
    ):
        assert fitted[term]["estimate"] == pytest.approx(direct.params[name])
        assert fitted[term]["std_error"] == pytest.approx(direct.bse[name])


def test_up_against_mp_is_paired_by_study_seed_and_round(sweep):
    result = C.compare(sweep)
    up = result["up_vs_mp"]
    # Simulated: UP's ratio is 0.1 above MP's, so MP - UP is about -0.1.
    assert up["n_units"] == 6 * 4
    assert up["ci_low"] < -0.1 < up["ci_high"]
    answer = next(a for a in result["answers"] if "weaker with UP" in a["question"])
    assert answer["answer"].startswith("no: it is stronger with UP")


def test_a_factor_that_does_not_vary_is_left_out(tmp_path):
    generator = np.random.default_rng(1)
    folders = [_fake_study(tmp_path / f"e{e}", e, 50_000, generator) for e in (0.05, 0.2)]
    result = C.compare(folders)
    assert result["terms_left_out"] == ["log2_params"]
    assert {c["term"] for c in result["coefficients"]} == {"intercept", "sparsity", "dense_error"}
    answer = next(a for a in result["answers"] if "less complex models" in a["question"])
    assert "not asked" in answer["answer"]


def test_studies_that_do_not_match_are_refused(tmp_path):
    generator = np.random.default_rng(2)
    a = _fake_study(tmp_path / "a", 0.1, 1000, generator)
    b = _fake_study(tmp_path / "b", 0.2, 1000, generator, num_classes=3)
    c = _fake_study(
        tmp_path / "c",
        0.2,
        1000,
        generator,
        criteria=("magnitude", "random"),
        effect={"magnitude": 0, "random": 0, "control": 0},
    )
    with pytest.raises(StudyError, match="differ in their number of classes \\(10 and 3\\)"):
        C.compare([a, b])
    with pytest.raises(StudyError, match="differ in their criteria"):
        C.compare([a, c])
    with pytest.raises(StudyError, match="at least two"):
        C.compare([a])
    with pytest.raises(StudyError, match="does not exist"):
        C.compare([a, tmp_path / "missing"])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: r.pop("analysis"), "no 'analysis' entry"),
        (lambda r: r["analysis"].pop("summaries"), "'analysis' holds no list of summaries"),
        (lambda r: r["runs"][1].pop("criterion"), "entry 1 of its runs has no valid 'criterion'"),
        (lambda r: r["runs"].__setitem__(0, 3), "entry 0 of its runs is not an object"),
        (
            lambda r: r["analysis"]["summaries"][2].__setitem__("ratios", "1.2"),
            "entry 2 of its analysis summaries has no valid 'ratios'",
        ),
        (
            lambda r: r["analysis"]["summaries"][0]["ratios"].pop(),
            "summary 0 has 4 seeds but 3 ratios",
        ),
        (lambda r: r["config"].pop("criteria"), "'config' holds no list of criteria"),
    ],
)
def test_a_damaged_results_file_is_refused_with_what_is_wrong(tmp_path, damage, message):
    """compare reads other people's folders: a results file it cannot use is refused,
    naming the file and what is wrong, instead of failing with a KeyError."""
    folder = _fake_study(tmp_path / "a", 0.1, 1000, np.random.default_rng(3))
    path = folder / "results.json"
    results = json.loads(path.read_text())
    damage(results)
    path.write_text(json.dumps(results))
    with pytest.raises(StudyError, match=re.escape(message)) as refused:
        C.load_study(folder)
    assert str(path) in str(refused.value)


def test_the_compare_command(sweep, tmp_path, capsys):
    from recallprune.study.cli import main

    out = tmp_path / "pooled"
    assert main(["compare", *map(str, sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Is intensification stronger on more difficult tasks?" in printed
    assert {p.name for p in out.iterdir()} == {
        "compare.md",
        "compare.json",
        "compare.csv",
        "compare.png",
    }
    assert main(["compare", str(sweep[0]), "--out", str(out)]) == 2
    assert "at least two" in capsys.readouterr().err


def test_ups_gradient_estimates_are_compared_with_mp_and_up(tmp_path):
    generator = np.random.default_rng(3)
    criteria = ("magnitude", "undecayed", "undecayed:full")
    effect = {"magnitude": 0.0, "undecayed": 0.1, "undecayed:full": 0.4, "control": -0.2}
    folders = [
        _fake_study(
            tmp_path / f"s{i}",
            0.05 * (i + 1),
            10_000 * (i + 1),
            generator,
            criteria=criteria,
            effect=effect,
        )
        for i in range(3)
    ]
    result = C.compare(folders)
    full = result["up_estimates"]["undecayed:full"]
    # The fake ratios differ by the effects alone, up to per-row noise of sd 0.1.
    assert full["mp_minus_arm"]["mean"] == pytest.approx(-0.4, abs=0.05)
    assert full["up_minus_arm"]["mean"] == pytest.approx(-0.3, abs=0.05)
    # By hand: per (study, seed), the mean over sparsities >= 0.8 of MP - arm.
    rows = result["rows"]
    units = []
    for study in {r["study"] for r in rows}:
        for seed in range(4):

            def ratios(criterion, study=study, seed=seed):
                return {
                    round(r["sparsity"], 6): r["ratio"]
                    for r in rows
                    if (r["study"], r["seed"], r["criterion"]) == (study, seed, criterion)
                    and r["sparsity"] >= C.HIGH_SPARSITY
                }

            mp, arm = ratios("magnitude"), ratios("undecayed:full")
            units.append(np.mean([mp[s] - arm[s] for s in mp]))
    assert full["mp_minus_arm"]["n_units"] == len(units) == 12
    assert full["mp_minus_arm"]["mean"] == pytest.approx(np.mean(units))
    assert full["mp_minus_arm"]["p_value"] == pytest.approx(stats.ttest_1samp(units, 0).pvalue)
    questions = [a["question"] for a in result["answers"]]
    assert "Does UP's gradient estimate change its intensification?" in questions
    answer = result["answers"][
        questions.index("Does UP's gradient estimate change its intensification?")
    ]
    assert f"undecayed:full: MP - it {full['mp_minus_arm']['mean']:+.3f}" in answer["answer"]
