"""The mitigations: the multipliers' step and the proxy Lagrangian against hand-computed
values, the constraint met where it is feasible and the multipliers growing where it is not,
class-balanced UP, and the mitigated arms of the study (naming, batched against sequential,
resume, report)."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from recallprune import ConstrainedFinetune, Pruner, UndecayedSGD
from recallprune.mitigation import (
    ClassMeasurements,
    Multipliers,
    excess_accuracy_drop,
    measure,
    multiplier_step,
    per_class_mean,
    proxy_lagrangian,
)
from recallprune.pruning import criteria
from recallprune.study import grid, runner
from recallprune.study.cli import main
from recallprune.study.config import StudyConfig, parse_arm, split_arm, study_arms
from recallprune.study.models import build_model
from recallprune.study.report import rebuild
from recallprune.study.stacked import stack_models

from .studies import interrupt_evaluation

# -- the math, by hand ---------------------------------------------------------------------


def test_multiplier_step_rises_exactly_where_the_violation_is_positive():
    multipliers = torch.tensor([0.0, 0.5, 0.2, 0.0, 0.3], dtype=torch.float64)
    violation = torch.tensor([0.1, -0.3, -0.05, 0.0, float("nan")], dtype=torch.float64)
    stepped = multiplier_step(multipliers, violation, step=2.0)
    # 0 + 2*0.1; max(0, 0.5 - 0.6); 0.2 - 0.1; unchanged at 0; a NaN (class not seen) leaves it.
    torch.testing.assert_close(stepped, torch.tensor([0.2, 0.0, 0.1, 0.0, 0.3]).double())
    assert multiplier_step(torch.zeros(3), -torch.ones(3), 5.0).eq(0).all()  # stays at zero


def test_proxy_lagrangian_by_hand():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0])
    targets = torch.tensor([0, 0, 1, 2])
    multipliers = torch.tensor([0.5, 0.0, 1.0, 2.0])  # class 3 absent from the batch
    torch.testing.assert_close(
        per_class_mean(losses, targets, 4), torch.tensor([1.5, 3.0, 4.0, 0.0])
    )
    # (mean 2.5 + 0.5 * 1.5 + 0 * 3 + 1 * 4 + 2 * 0) / (1 + 3.5)
    got = proxy_lagrangian(losses, targets, multipliers)
    assert got.item() == pytest.approx((2.5 + 0.75 + 4.0) / 4.5)
    # Zero multipliers: the plain mean loss. Stacked: each model its own.
    assert proxy_lagrangian(losses, targets, torch.zeros(4)).item() == pytest.approx(2.5)
    stacked = proxy_lagrangian(
        losses.expand(2, 4), targets.expand(2, 4), torch.stack([multipliers, torch.zeros(4)])
    )
    torch.testing.assert_close(stacked, torch.stack([got, torch.tensor(2.5)]))


def test_excess_accuracy_drop_by_hand():
    dense = torch.tensor([[9, 1], [1, 9]])  # recalls 0.9, 0.9; accuracy 0.9
    pruned = torch.tensor([[10, 0], [4, 6]])  # recalls 1.0, 0.6; accuracy 0.8
    # (0.9 - 1.0) - (0.9 - 0.8) = -0.2; (0.9 - 0.6) - 0.1 = 0.2
    torch.testing.assert_close(
        excess_accuracy_drop(dense, pruned), torch.tensor([-0.2, 0.2], dtype=torch.float64)
    )


def test_one_epoch_update_from_the_counts_by_hand():
    dense = torch.tensor([[9, 1], [1, 9]])
    state = Multipliers("constrained", dense, torch.zeros(2), epsilon=0.05, step=10.0)
    # One epoch's predictions whose counts are [[10, 0], [4, 6]]: violation (-0.25, 0.15).
    predicted = torch.tensor([0] * 10 + [0] * 4 + [1] * 6)
    targets = torch.tensor([0] * 10 + [1] * 10)
    logits = nn.functional.one_hot(predicted, 2).float()
    state.objective(logits, targets, torch.zeros(20))
    violation = state.end_epoch()
    torch.testing.assert_close(violation, torch.tensor([-0.25, 0.15]).double())
    torch.testing.assert_close(state.value, torch.tensor([0.0, 1.5]).double())
    assert len(state.history) == 1 and state.measurements.counts().sum() == 0  # a fresh count
    # Loss gap: per class, the epoch's mean loss minus the dense one, minus epsilon.
    gap = Multipliers("loss-gap", dense, torch.tensor([0.1, 0.2]), epsilon=0.05, step=1.0)
    gap.objective(logits, targets, torch.tensor([0.2] * 10 + [0.1] * 10))
    torch.testing.assert_close(gap.end_epoch(), torch.tensor([0.05, -0.15]).double())
    # Stacked, a kind per model; "none" keeps its multipliers at zero.
    both = Multipliers(["none", "constrained"], dense.expand(2, 2, 2), torch.zeros(2, 2), 0.05)
    both.objective(logits.expand(2, 20, 2), targets.expand(2, 20), torch.zeros(2, 20))
    both.end_epoch()
    assert both.value[0].eq(0).all() and both.value[1, 1] > 0


def test_multipliers_refuse_bad_settings():
    with pytest.raises(ValueError, match="epsilon must be a finite non-negative number, got -1"):
        Multipliers("constrained", torch.eye(2), torch.zeros(2), epsilon=-1)
    with pytest.raises(ValueError, match="kinds must be one of"):
        Multipliers("balanced", torch.eye(2), torch.zeros(2))
    with pytest.raises(ValueError, match="one per stacked model"):
        Multipliers(["none"], torch.eye(2).expand(2, 2, 2), torch.zeros(2, 2))
    # An infinite step would make the multipliers of unmitigated models in a stack NaN.
    with pytest.raises(ValueError, match="step must be a finite non-negative number, got inf"):
        Multipliers("constrained", torch.eye(2), torch.zeros(2), step=float("inf"))
    with pytest.raises(ValueError, match=r"dense_counts \[\.\.\., C, C\] with the same leading"):
        Multipliers("constrained", torch.eye(3), torch.zeros(5))
    with pytest.raises(ValueError, match=r"initial must be a tensor of the multipliers' shape"):
        Multipliers("constrained", torch.eye(2), torch.zeros(2), initial=torch.zeros(1))
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="initial multipliers must be finite and non-neg"):
            Multipliers("loss-gap", torch.eye(2), torch.zeros(2), initial=torch.tensor([0, bad]))


# -- the constraint on a small task --------------------------------------------------------


def _task():
    """Four classes, half of the samples in class 0; 512 samples in batches of 64."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=g) * 1.5
    y = torch.cat([torch.zeros(256, dtype=torch.long), torch.randint(1, 4, (256,), generator=g)])
    x = centers[y] + torch.randn(512, 8, generator=g)
    order = torch.randperm(512, generator=g)
    x, y = x[order], y[order]
    return [(x[i : i + 64], y[i : i + 64]) for i in range(0, 512, 64)]


@pytest.fixture(scope="module")
def dense_model():
    loader = _task()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(15):
        for inputs, targets in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
    return model, loader


def _pruned(dense, sparsity, lr=0.05):
    model = copy.deepcopy(dense)
    optimizer = UndecayedSGD(model.parameters(), lr=lr, momentum=0.9)
    Pruner(model, "magnitude", optimizer=optimizer, exclude=("2",)).prune(sparsity=sparsity)
    return model, optimizer


def _excess(dense, model, loader):
    reference, pruned = (measure(m.eval(), loader, 4) for m in (dense, model))
    return excess_accuracy_drop(reference.counts(), pruned.counts())


def test_the_constraint_is_met_where_it_is_feasible(dense_model):
    dense, loader = dense_model
    epsilon = 0.02
    plain, optimizer = _pruned(dense, 0.9)
    for _ in range(20):
        for inputs, targets in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(plain(inputs), targets).backward()
            optimizer.step()
    assert _excess(dense, plain, loader).max() > epsilon + 0.01  # the constraint has work to do
    model, optimizer = _pruned(dense, 0.9)
    finetune = ConstrainedFinetune(model, optimizer, loader, 4, dense, epsilon=epsilon, step=2.0)
    history = finetune.fit(20)
    assert len(history) == 20 and len(finetune.violations) == 20
    assert finetune.multipliers.max() > 0  # it was active
    assert _excess(dense, model, loader).max() <= epsilon + 0.01
    assert finetune.violations[-1].max() <= 0.01  # as measured during its last epoch


def test_the_multipliers_grow_where_the_constraint_cannot_be_met(dense_model):
    dense, loader = dense_model
    # Nothing can change (learning rate 0): the violation stays, so the multipliers of the
    # violated classes grow by step * violation each epoch, and the others stay at zero.
    model, optimizer = _pruned(dense, 0.95, lr=0.0)
    finetune = ConstrainedFinetune(model, optimizer, loader, 4, dense, epsilon=0.02, step=0.5)
    history = torch.stack(finetune.fit(5))
    violation = finetune.violations[0]
    assert (violation > 0).any() and (violation < 0).any()
    for epoch in range(5):
        torch.testing.assert_close(
            history[epoch], (epoch + 1) * 0.5 * violation.clamp_min(0), msg=f"epoch {epoch}"
        )


def test_loss_gap_fine_tuning_stays_stable_on_an_infeasible_constraint(dense_model):
    dense, loader = dense_model
    model, optimizer = _pruned(dense, 0.95)
    finetune = ConstrainedFinetune(
        model, optimizer, loader, 4, dense, mitigation="loss-gap", epsilon=0.0, step=5.0
    )
    finetune.fit(15)
    multipliers = torch.stack(finetune.history)
    assert multipliers[-1].max() > multipliers[0].max()  # growing where it is not met
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert (torch.stack(finetune.violations)[-1] < 1.0).all()  # no divergence


def test_constrained_finetune_refuses_what_it_cannot_use(dense_model):
    dense, loader = dense_model
    model, optimizer = _pruned(dense, 0.5)
    with pytest.raises(ValueError, match="mitigation must be one of"):
        ConstrainedFinetune(model, optimizer, loader, 4, dense, mitigation="none")
    with pytest.raises(ValueError, match="give the dense model, or both"):
        ConstrainedFinetune(model, optimizer, loader, 4)
    reference = measure(dense.eval(), loader, 4)
    counts, losses = reference.counts(), reference.class_losses()
    with pytest.raises(
        ValueError, match=r"dense_losses must be \[num_classes\] = \[7\], got \(4,\)"
    ):
        ConstrainedFinetune(model, optimizer, loader, 7, dense_counts=counts, dense_losses=losses)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"dense_counts \[\.\.\., C, C\]"):
        ConstrainedFinetune(
            model, optimizer, loader, 4, dense_counts=counts[:3, :3], dense_losses=losses
        )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- class-balanced UP ---------------------------------------------------------------------


def test_class_balanced_weights():
    weights = criteria.class_balanced_weights(torch.tensor([0, 0, 0, 2]))
    torch.testing.assert_close(weights, torch.tensor([1 / 6, 1 / 6, 1 / 6, 1 / 2]))
    balanced = criteria.class_balanced_weights(torch.tensor([[1, 0, 1, 0], [2, 2, 2, 2]]))
    torch.testing.assert_close(balanced, torch.full((2, 4), 0.25))


def _scores(model, criterion, batch):
    pruner = Pruner(copy.deepcopy(model), criterion, lam=5e-4, exclude=("2",))
    return pruner.scores(data=[batch])


def test_class_balanced_up_is_up_on_a_balanced_batch_and_differs_otherwise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(12, 6)
    balanced = (x, torch.arange(12) % 3)
    up, balanced_up = (_scores(model, c, balanced) for c in ("undecayed", "undecayed-balanced"))
    for name in up:
        torch.testing.assert_close(balanced_up[name], up[name], rtol=1e-5, atol=1e-9)
    skewed = (x, torch.tensor([0] * 9 + [1, 2, 2]))
    up, balanced_up = (_scores(model, c, skewed) for c in ("undecayed", "undecayed-balanced"))
    assert not torch.allclose(balanced_up["0.weight"], up["0.weight"])
    # Its gradient is that of the class-balanced loss: UP with that loss given explicitly.
    explicit = Pruner(copy.deepcopy(model), "undecayed", lam=5e-4, exclude=("2",)).scores(
        data=[skewed], loss_fn=criteria.class_balanced_cross_entropy
    )
    torch.testing.assert_close(balanced_up["0.weight"], explicit["0.weight"])


def test_class_balanced_up_refuses_the_running_average():
    """The optimizer averages the gradient of the training loss, not the class-balanced
    one: an average would silently score as plain UP."""
    with pytest.raises(ValueError, match="not of the class-balanced loss"):
        parse_arm("undecayed-balanced:average")
    assert parse_arm("undecayed:average") == ("undecayed", "average")
    model = nn.Sequential(nn.Linear(6, 3))
    optimizer = UndecayedSGD(model.parameters(), lr=0.1, track_grad_avg=True)
    pruner = Pruner(model, "undecayed-balanced", optimizer=optimizer, lam=5e-4)
    with pytest.raises(ValueError, match="grad_source='average' does not suit the undecayed-b"):
        pruner.scores(grad_source="average")


def test_stacked_gradients_take_the_class_balanced_loss_per_model():
    torch.manual_seed(0)
    models = [build_model("mlp", (1, 8, 8), 3) for _ in range(2)]
    stacked = stack_models(models)
    skewed = torch.tensor([0] * 7 + [1, 2, 2])
    batches = [[(torch.randn(10, 1, 8, 8), skewed)] for _ in range(2)]
    got = grid.stacked_gradients(stacked, batches, torch.device("cpu"), balanced=[True, False])
    for i, loss_fn in enumerate((criteria.class_balanced_cross_entropy, None)):
        own = Pruner(models[i], "gradient").gather_gradients(batches[i], loss_fn=loss_fn)
        for weight, grad in own.items():
            torch.testing.assert_close(got[i][weight], grad, rtol=1e-4, atol=1e-6, msg=weight)
    plain = Pruner(models[0], "gradient").gather_gradients(batches[0])
    assert not torch.allclose(got[0][weight], plain[weight])


# -- the study's mitigated arms ------------------------------------------------------------


def test_arm_names():
    assert study_arms(["magnitude", "undecayed:4"], ["none", "constrained", "loss-gap"]) == [
        "magnitude",
        "magnitude+constrained",
        "magnitude+loss-gap",
        "undecayed:4",
        "undecayed:4+constrained",
        "undecayed:4+loss-gap",
    ]
    assert split_arm("undecayed:4+loss-gap") == ("undecayed:4", "loss-gap")
    assert parse_arm("undecayed:4+loss-gap") == ("undecayed", 4)
    assert parse_arm("undecayed-balanced:full") == ("undecayed-balanced", "full")
    with pytest.raises(ValueError, match="the mitigation after '\\+' must be one of"):
        split_arm("magnitude+fair")
    config = StudyConfig(mitigations=["constrained"], criteria=["random"])
    assert config.arms() == ["random+constrained"]
    assert runner.Study.base("random+constrained") == "random"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"mitigations": ["constrained"], "retrain": "rewind"}, "need retrain 'finetune'"),
        ({"mitigations": ["fair"]}, "mitigations must be of"),
        ({"mitigations": []}, "mitigations must name at least one"),
        ({"mitigations": ["none", "none"]}, "mitigations must be distinct"),
        ({"criteria": ["magnitude+constrained"]}, "give it with|names a mitigation"),
        ({"multiplier_step": 0.0}, "multiplier_step must be positive"),
        ({"epsilon": -0.1}, "epsilon must be at least 0"),
    ],
)
def test_study_settings_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        StudyConfig.from_dict(settings)


TINY = [
    "--seeds",
    "0",
    "1",
    "--rounds",
    "2",
    "--epochs",
    "2",
    "--finetune-epochs",
    "2",
    "--criteria",
    "magnitude",
    "undecayed-balanced",
    "--mitigations",
    "none",
    "constrained",
    "loss-gap",
    "--device",
    "cpu",
]


def _study(out, execution, *extra):
    assert main(["-q", "study", *TINY, "--execution", execution, *extra, "--out", str(out)]) == 0
    return json.loads((Path(out) / "results.json").read_text())


def _strip(runs):
    return sorted(
        json.dumps({k: v for k, v in r.items() if k != "seconds"}, sort_keys=True) for r in runs
    )


@pytest.fixture(scope="module")
def mitigated_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("mitigated") / "sequential"
    return out, _study(out, "sequential")


def test_a_mitigated_study_runs_every_arm_and_records_the_multipliers(mitigated_study):
    _, results = mitigated_study
    arms = {r["criterion"] for r in results["runs"]}
    assert arms == {
        "dense",
        "control",
        "magnitude",
        "magnitude+constrained",
        "magnitude+loss-gap",
        "undecayed-balanced",
        "undecayed-balanced+constrained",
        "undecayed-balanced+loss-gap",
    }
    for run in results["runs"]:
        if "+" in run["criterion"]:
            assert len(run["multipliers"]) == 2 and len(run["multipliers"][0]) == 10
            assert len(run["violations"]) == 2
            assert min(min(m) for m in run["multipliers"]) >= 0
        else:
            assert "multipliers" not in run
    # The constraint was active somewhere in the study (the multipliers rose).
    assert max(max(m) for r in results["runs"] for m in r.get("multipliers", [[0]])) > 0


@pytest.mark.parametrize("execution", ["sequential", "batched"])
def test_an_inactive_mitigation_changes_nothing(execution, tmp_path):
    """A bound no class can break keeps the multipliers at 0: every mitigated arm then
    trains, prunes (class-balanced UP from its scoring batches) and counts exactly as the
    unmitigated arm of its criterion, round after round."""
    results = _study(tmp_path / execution, execution, "--epsilon", "1000")
    runs = {(r["seed"], r["criterion"], r["round"]): r for r in results["runs"]}
    mitigated = [key for key in runs if "+" in key[1]]
    assert len(mitigated) == 2 * 4 * 2  # seeds x mitigated arms x rounds
    for seed, arm, round_ in mitigated:
        run, plain = runs[(seed, arm, round_)], runs[(seed, arm.split("+")[0], round_)]
        assert max(max(m) for m in run["multipliers"]) == 0
        assert run["confusion"] == plain["confusion"], (seed, arm, round_)
        assert run["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-6)


def test_the_multipliers_carry_from_round_to_round(mitigated_study):
    """Round 2 starts from the multipliers round 1 ended with: its first epoch's multipliers
    are those plus one step on the violation it measured."""
    _, results = mitigated_study
    step = results["config"]["multiplier_step"]
    runs = {(r["seed"], r["criterion"], r["round"]): r for r in results["runs"]}
    carried = 0
    for (seed, arm, round_), run in runs.items():
        if "+" not in arm or round_ != 2:
            continue
        before = torch.tensor(runs[(seed, arm, 1)]["multipliers"][-1], dtype=torch.float64)
        violation = torch.tensor(
            [float("nan") if v is None else v for v in run["violations"][0]], dtype=torch.float64
        )
        expected = multiplier_step(before, violation, step)
        torch.testing.assert_close(
            torch.tensor(run["multipliers"][0], dtype=torch.float64), expected
        )
        carried += int(bool((before > 0).any()))
    assert carried > 0  # some model ended round 1 with a multiplier above zero


def test_saved_multipliers_join_the_stack_on_the_training_device(tmp_path):
    """A checkpoint's multipliers (saved on the CPU) and the zeros of unmitigated models
    join one stack on the training device ("meta" standing in for a GPU here)."""
    config = StudyConfig(
        seeds=[0], criteria=["magnitude"], mitigations=["none", "constrained"], device="cpu"
    )
    study = grid.BatchedStudy(config, tmp_path / "study", progress=False)
    study.device = torch.device("meta")
    classes = 10
    study._references[0] = (
        torch.zeros(classes, classes, dtype=torch.int64, device="meta"),
        torch.zeros(classes, dtype=torch.float64, device="meta"),
    )
    cells = [(0, "control"), (0, "magnitude"), (0, "magnitude+constrained")]
    states = [{}, {}, {"multipliers": torch.ones(classes, dtype=torch.float64)}]
    multipliers = study.stacked_multipliers(cells, None, states)
    assert multipliers.value.device.type == "meta" and multipliers.value.shape == (3, classes)


def test_a_batched_mitigated_study_agrees_with_the_sequential_one(mitigated_study, tmp_path):
    _, sequential = mitigated_study
    batched = _study(tmp_path / "batched", "batched")
    assert len(batched["runs"]) == len(sequential["runs"])
    by_key = {(r["seed"], r["criterion"], r["round"]): r for r in sequential["runs"]}
    for run in batched["runs"]:
        other = by_key[(run["seed"], run["criterion"], run["round"])]
        assert run["confusion"] == other["confusion"], (run["criterion"], run["round"])
        assert len(run.get("multipliers", [])) == len(other.get("multipliers", []))
        for mine, theirs in zip(
            run.get("multipliers", []), other.get("multipliers", []), strict=True
        ):
            assert mine == pytest.approx(theirs, abs=1e-4)


def test_an_interrupted_mitigated_study_resumes_with_its_multipliers(
    mitigated_study, tmp_path, monkeypatch
):
    _, complete = mitigated_study
    out = tmp_path / "resumed"
    # The 7th evaluation: round 2 of seed 0's magnitude+constrained, which resumes from the
    # multipliers its round-1 checkpoint holds.
    evaluate = interrupt_evaluation(monkeypatch, at=7)
    assert main(["-q", "study", *TINY, "--execution", "sequential", "--out", str(out)]) == 130
    monkeypatch.setattr(runner, "evaluate", evaluate)
    resumed = _study(out, "sequential")
    assert _strip(resumed["runs"]) == _strip(complete["runs"])


def test_the_report_compares_every_arm(mitigated_study, tmp_path):
    out, results = mitigated_study
    report = (out / "report.md").read_text()
    assert "## Mitigations" in report and (out / "multipliers.png").stat().st_size > 1000
    assert "4. **Do the mitigations reduce the largest per-class excess accuracy drop" in report
    section = report.split("## Mitigations")[1].split("## Per-class")[0]
    assert "| - unmitigated [95% CI], adjusted p | - UP [95% CI], adjusted p |" in section
    for arm in ("magnitude+constrained", "undecayed-balanced+loss-gap", "magnitude"):
        assert f"| {arm} | 0.360 |" in section
    ratio = report.split("## Intensification ratio")[1].split("## Mitigations")[0]
    assert "| magnitude+loss-gap | 0.360 |" in ratio  # the same statistics as every arm
    # A results file from before mitigations (no such settings, no multipliers) still reads.
    old = tmp_path / "old"
    shutil.copytree(out, old)
    for key in ("mitigations", "epsilon", "multiplier_step"):
        del results["config"][key]
    results["runs"] = [r for r in results["runs"] if "+" not in r["criterion"]]
    for run in results["runs"]:
        run.pop("multipliers", None)
    (old / "results.json").write_text(json.dumps(results))
    (old / "multipliers.png").unlink()
    rebuilt = rebuild(old)
    assert "## Mitigations" not in (old / "report.md").read_text()
    # Mitigated arms without their unmitigated arms: answer 4 says there is nothing to pair.
    only = tmp_path / "only-mitigated"
    shutil.copytree(out, only)
    full = json.loads((out / "results.json").read_text())
    plain = {"magnitude", "undecayed-balanced"}
    full["runs"] = [r for r in full["runs"] if r["criterion"] not in plain]
    full["config"]["mitigations"] = ["constrained", "loss-gap"]
    (only / "results.json").write_text(json.dumps(full))
    rebuild(only)
    answer = (only / "report.md").read_text().split("4. **Do the mitigations")[1]
    assert answer.split("\n")[0].endswith(
        "Not measured: no mitigated arm has its unmitigated arm in this study (run with "
        "`--mitigations none ...` to compare them)."
    )
    assert not (old / "multipliers.png").exists()
    assert {r["criterion"] for r in rebuilt["runs"]} >= {"magnitude", "control"}


def test_measurements_sum_over_ranks_once(monkeypatch):
    """Data-parallel: the epoch's per-class losses are those of both ranks' samples, however
    often sync() is called (every call takes part in the collective)."""
    from torch import distributed

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    targets = torch.tensor([0, 1, 1])
    losses = torch.tensor([0.5, 1.0, 3.0])
    other = torch.tensor([[1.5, 2.0], [1.0, 1.0]], dtype=torch.float64)  # sums, samples
    calls = []

    def all_reduce(tensor, op=None):
        calls.append(tuple(tensor.shape))
        if tensor.dtype == torch.float64:
            tensor.add_(other if bool(tensor.any()) else torch.zeros_like(tensor))
        else:
            tensor.mul_(2)  # the confusion counts: an identical second rank

    monkeypatch.setattr(distributed, "is_available", lambda: True)
    monkeypatch.setattr(distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed, "all_reduce", all_reduce)
    measurements = ClassMeasurements(2)
    measurements.update(logits, targets, losses)
    expected = torch.tensor(
        [(0.5 + 1.5) / (1 + 1), (1.0 + 3.0 + 2.0) / (2 + 1)], dtype=torch.float64
    )
    for _ in range(3):
        measurements.sync()
        torch.testing.assert_close(measurements.class_losses(), expected)
    assert sum(shape == (2, 2) for shape in calls) == 3
