"""The grid as stacked models: stacked layers against the single models, a few training
steps against the sequential loop, a whole small study against its sequential twin, resume
of an interrupted batched study, and the fallback for models that cannot be stacked."""

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from recallprune import UndecayedSGD, decay_param_groups
from recallprune.study import grid
from recallprune.study.cli import main
from recallprune.study.models import build_model
from recallprune.study.stacked import stack_models

from .conftest import requires_cuda

TINY = [
    "--seeds",
    "0",
    "1",
    "2",
    "--rounds",
    "3",
    "--epochs",
    "3",
    "--finetune-epochs",
    "1",
    "--criteria",
    "magnitude",
    "undecayed",
    "random",
    "--device",
    "cpu",
]


def _runs(out):
    return json.loads((Path(out) / "results.json").read_text())["runs"]


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_stacked_layers_match_the_single_models(name):
    torch.manual_seed(0)
    models = [build_model(name, (1, 8, 8), 10) for _ in range(3)]
    stacked = stack_models(models)
    assert [n for n, _ in stacked.named_parameters()] == [
        n for n, _ in models[0].named_parameters()
    ]
    x = torch.randn(3, 16, 1, 8, 8)
    y = torch.randint(0, 10, (3, 16))
    logits = stacked(x)
    for i, model in enumerate(models):
        torch.testing.assert_close(logits[i], model(x[i]), rtol=1e-5, atol=1e-6)
    nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").backward()
    for i, model in enumerate(models):
        nn.functional.cross_entropy(model(x[i]), y[i], reduction="sum").backward()
        for (n, p), q in zip(stacked.named_parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(p.grad[i], q.grad, rtol=1e-5, atol=1e-6, msg=n)
    # A model's state goes in and out by the single model's names.
    state = stacked.model_state(1)
    assert state.keys() == models[1].state_dict().keys()
    stacked.load_model_state(0, state)
    torch.testing.assert_close(stacked(x[:1].expand(3, *x.shape[1:]))[0], models[1](x[0]))


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_stacks_built_from_states_and_states_taken_from_stacks(name):
    from recallprune.study.stacked import stack_states

    torch.manual_seed(3)
    models = [build_model(name, (1, 8, 8), 10) for _ in range(3)]
    expected = stack_models(models)
    with torch.device("meta"):
        template = build_model(name, (1, 8, 8), 10)
    stacked = stack_states(template, [m.state_dict() for m in models])
    assert type(stacked) is type(expected) and stacked.num_models == 3
    for (n, p), (m, q) in zip(stacked.named_parameters(), expected.named_parameters(), strict=True):
        assert n == m and p.device.type == "cpu" and torch.equal(p, q), n
    x = torch.randn(3, 5, 1, 8, 8)
    torch.testing.assert_close(stacked(x), expected(x), rtol=0, atol=0)
    # Each model's state on the host, compact (a checkpoint saves no other model's weights).
    states = stacked.model_states()
    assert len(states) == 3
    for i, state in enumerate(states):
        assert state.keys() == models[i].state_dict().keys()
        for n, tensor in state.items():
            assert torch.equal(tensor, stacked.model_state(i)[n])
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    assert stack_states(build_model("resnet20", (3, 32, 32), 10), [{}]) is None


@pytest.mark.parametrize("compact", [False, True])
def test_a_few_masked_steps_match_the_sequential_loop(compact):
    """Masked fine-tuning, stacked (the masks stacked in the optimizer, or the layer compact:
    its kept weights alone) as one model at a time; the pruned weights start at 0, as a
    pruner leaves them."""
    torch.manual_seed(1)
    models = [build_model("mlp", (1, 8, 8), 10) for _ in range(4)]
    masks = [torch.rand_like(m.fc1.weight) > 0.5 for m in models]
    with torch.no_grad():
        for model, mask in zip(models, masks, strict=True):
            model.fc1.weight.mul_(mask)
    stacked = stack_models([m for m in models])
    if compact:
        stacked.compact({"fc1.weight": torch.stack(masks)})
    x = torch.randn(200, 1, 8, 8)
    y = torch.randint(0, 10, (200,))
    optimizers = [UndecayedSGD(decay_param_groups(m, 5e-4), lr=0.05, momentum=0.9) for m in models]
    for optimizer, model, mask in zip(optimizers, models, masks, strict=True):
        optimizer.set_mask(model.fc1.weight, mask)
    stacked_optimizer = UndecayedSGD(decay_param_groups(stacked, 5e-4), lr=0.05, momentum=0.9)
    if not compact:
        stacked_optimizer.set_mask(stacked.fc1.weight, torch.stack(masks))
    generators = [torch.Generator().manual_seed(s) for s in range(4)]
    twins = [torch.Generator().manual_seed(s) for s in range(4)]
    for _ in range(5):
        orders = grid.stacked_batches(200, 32, generators)
        for i, (model, optimizer) in enumerate(zip(models, optimizers, strict=True)):
            order = torch.randperm(200, generator=twins[i])
            assert torch.equal(order, orders[i])  # the same data order as the sequential loop
            batch = order[:32]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
        batch = orders[:, :32]
        stacked_optimizer.zero_grad()
        losses = nn.functional.cross_entropy(
            stacked(x[batch]).flatten(0, 1), y[batch].flatten(), reduction="none"
        )
        losses.view(4, 32).mean(dim=1).sum().backward()
        stacked_optimizer.step()
    stacked.expand()
    for i, model in enumerate(models):
        for (name, p), q in zip(stacked.named_parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(p[i], q, rtol=1e-5, atol=1e-6, msg=name)
        assert torch.all(stacked.fc1.weight[i][~masks[i]] == 0)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_stacked_gradients_match_each_models_own(name):
    from recallprune import Pruner

    torch.manual_seed(2)
    models = [build_model(name, (1, 8, 8), 10) for _ in range(4)]
    stacked = stack_models(models)

    def batches(n, size, last):
        sizes = [size] * (n - 1) + [last]
        return [(torch.randn(k, 1, 8, 8), torch.randint(0, 10, (k,))) for k in sizes]

    # Unequal counts and sizes of batches, and a model that wants none.
    own = [batches(2, 16, 16), None, batches(3, 16, 5), batches(1, 7, 7)]
    for p in stacked.parameters():
        p.grad = torch.ones_like(p)
    got = grid.stacked_gradients(stacked, own, torch.device("cpu"))
    assert got[1] is None
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in stacked.parameters())
    for i in (0, 2, 3):
        expected = Pruner(models[i], "gradient").gather_gradients(own[i], n_batches=len(own[i]))
        for weight, grad in expected.items():
            torch.testing.assert_close(got[i][weight], grad, rtol=1e-4, atol=1e-6, msg=weight)
    assert grid.stacked_gradients(stacked, [None] * 4, torch.device("cpu")) == [None] * 4


def test_a_batched_study_agrees_with_the_sequential_one(tmp_path):
    sequential, batched = tmp_path / "sequential", tmp_path / "batched"
    assert main(["-q", "study", *TINY, "--execution", "sequential", "--out", str(sequential)]) == 0
    assert main(["-q", "study", *TINY, "--max-stack", "7", "--out", str(batched)]) == 0
    assert json.loads((batched / "config.json").read_text())["execution"] == "batched"
    a, b = _runs(sequential), _runs(batched)
    assert [(r["seed"], r["criterion"], r["round"]) for r in a] == [
        (r["seed"], r["criterion"], r["round"]) for r in b
    ]
    # The same initialisations, data orders and pruning: exact counts, the same sparsities.
    assert [r["sparsity"] for r in a] == [r["sparsity"] for r in b]
    # Trajectories may differ by the rounding of batched products: accuracies close, most
    # models predicting exactly alike.
    for x, y in zip(a, b, strict=True):
        assert abs(x["accuracy"] - y["accuracy"]) <= 0.02, (x["criterion"], x["round"])
    same = sum(x["confusion"] == y["confusion"] for x, y in zip(a, b, strict=True))
    assert same >= 0.8 * len(a)


def test_an_interrupted_batched_study_resumes(tmp_path, monkeypatch):
    complete = tmp_path / "complete"
    assert main(["-q", "study", *TINY, "--out", str(complete)]) == 0
    out = tmp_path / "interrupted"
    original = grid.BatchedStudy.round_stage

    def stop_at_round_two(self, round_index, data, bar):
        if round_index == 2:
            raise KeyboardInterrupt
        return original(self, round_index, data, bar)

    monkeypatch.setattr(grid.BatchedStudy, "round_stage", stop_at_round_two)
    assert main(["-q", "study", *TINY, "--out", str(out)]) == 130
    assert not (out / "results.json").exists()
    assert len(list((out / "runs").glob("*-r01.json"))) == 3 * 4
    monkeypatch.setattr(grid.BatchedStudy, "round_stage", original)
    assert main(["-q", "study", *TINY, "--out", str(out)]) == 0
    assert _runs(out) == _runs(complete) or [r["confusion"] for r in _runs(out)] == [
        r["confusion"] for r in _runs(complete)
    ]


def test_held_checkpoints_are_those_read_back(tmp_path, monkeypatch):
    """A stage that fits in one stack hands its checkpoints to the next in memory; the study
    is the same as one that reads every checkpoint back from its folder."""
    from recallprune.study import files
    from recallprune.study import folder as study_folder

    reads = []

    def counted(path):
        reads.append(path)
        return files.load_checkpoint(path)

    monkeypatch.setattr(study_folder, "load_checkpoint", counted)
    held = tmp_path / "held"
    assert main(["-q", "study", *TINY, "--out", str(held)]) == 0
    assert reads == []  # 3 seeds x 4 arms: one stack per stage, nothing read back
    # Nothing held: every round reads its checkpoints (and the dense ones) from the folder.
    nothing = property(lambda self: {}, lambda self, value: None)
    for name in ("_dense_held", "_round_held"):
        monkeypatch.setattr(grid.BatchedStudy, name, nothing, raising=False)
    read = tmp_path / "read"
    assert main(["-q", "study", *TINY, "--out", str(read)]) == 0
    assert len(reads) == 3 * 4 * 3 + 3 * 4 * 2  # dense per cell and round, rounds 2 and 3

    def without_time(out):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in _runs(out)]

    assert without_time(held) == without_time(read)
    names = sorted(p.name for p in (held / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (read / "checkpoints").iterdir())
    for name in names:
        a, b = (torch.load(out / "checkpoints" / name, weights_only=True) for out in (held, read))
        assert a.keys() == b.keys()
        for part in a:
            assert a[part].keys() == b[part].keys()
            assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), (name, part)


def test_models_that_cannot_be_stacked_fall_back_to_sequential(tmp_path, caplog):
    assert grid.can_stack(build_model("mlp", (1, 8, 8), 10))
    assert grid.can_stack(build_model("cnn", (1, 8, 8), 10))
    assert not grid.can_stack(build_model("resnet20", (3, 32, 32), 10))  # batch norm
    out = tmp_path / "resnet"
    args = ["study", "--model", "resnet20", "--seeds", "0", "--rounds", "1", "--epochs", "1"]
    args += ["--finetune-epochs", "1", "--criteria", "magnitude", "--device", "cpu"]
    with caplog.at_level(logging.INFO, logger="recallprune.study"):
        assert main([*args, "--out", str(out)]) == 0
    said = [r.message for r in caplog.records if "execution" in r.message]
    assert said == [
        "execution: sequential, since model 'resnet20' cannot be stacked (only mlp and cnn can)"
    ]
    assert len(_runs(out)) == 3


def _cells(runs):
    return [(r["seed"], r["criterion"], r["round"], r["sparsity"], r["confusion"]) for r in runs]


def test_shards_write_one_study_that_matches_one_process(tmp_path, capsys):
    sequential = [*TINY, "--execution", "sequential"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(["-q", "study", *sequential, "--out", str(whole)]) == 0
    # The second shard (seed 1) finishes first: no results yet, and report says what is missing.
    assert main(["-q", "study", *sequential, "--shard", "2/2", "--out", str(parts)]) == 0
    assert "runs of other shards are not finished yet" in capsys.readouterr().out
    assert not (parts / "results.json").exists()
    assert main(["-q", "report", str(parts)]) == 2
    assert "holds 13 of the study's 39 runs" in capsys.readouterr().err
    # The last shard writes the whole study's results, as one process would have.
    assert main(["-q", "study", *sequential, "--shard", "1/2", "--out", str(parts)]) == 0
    assert _cells(_runs(parts)) == _cells(_runs(whole))
    # `report` merges the run records of a study whose results were never written.
    (parts / "results.json").unlink()
    (parts / "report.md").unlink()
    assert main(["-q", "report", str(parts)]) == 0
    assert _cells(_runs(parts)) == _cells(_runs(whole))
    assert (parts / "report.md").exists()


def test_shards_of_a_batched_study_and_their_errors(tmp_path, capsys):
    out = tmp_path / "parts"
    for shard in ("1/3", "3/3", "2/3"):
        assert main(["-q", "study", *TINY, "--shard", shard, "--out", str(out)]) == 0
    runs = _runs(out)
    assert sorted({r["seed"] for r in runs}) == [0, 1, 2] and len(runs) == 39
    assert main(["-q", "study", *TINY, "--shard", "4/4", "--out", str(tmp_path / "b")]) == 2
    assert "--shard 4/4 has no seeds: the study has 3 seed(s)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["-q", "study", *TINY, "--shard", "0/2", "--out", str(tmp_path / "c")])
    assert "--shard must be I/N with 1 <= I <= N" in capsys.readouterr().err
    assert main(["-q", "study", *TINY, "--shard", "1/2"]) == 2
    assert "--shard needs the folder that every shard writes into" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


ARMS = ["magnitude", "undecayed:2", "undecayed:full", "undecayed:average"]


def test_gradient_estimate_arms_batched_and_sequential(tmp_path):
    from recallprune.study.config import StudyConfig
    from recallprune.study.runner import Study

    args = ["--seeds", "0", "1", "--rounds", "2", "--epochs", "3", "--finetune-epochs", "2"]
    args += ["--device", "cpu", "--criteria", *ARMS]
    sequential, batched = tmp_path / "sequential", tmp_path / "batched"
    assert main(["-q", "study", *args, "--execution", "sequential", "--out", str(sequential)]) == 0
    assert main(["-q", "study", *args, "--out", str(batched)]) == 0
    a, b = _runs(sequential), _runs(batched)
    assert {r["criterion"] for r in a} == {"dense", "control", *ARMS}
    assert [r["sparsity"] for r in a] == [r["sparsity"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert abs(x["accuracy"] - y["accuracy"]) <= 0.03, (x["criterion"], x["round"])

    for out in (sequential, batched):
        dense = torch.load(out / "checkpoints" / "seed1-dense-r00.pt", weights_only=True)
        # The dense training's last-epoch gradient average, for the :average arm only.
        assert dense["grad_average"].keys() == dense["model"].keys()
        assert all(g.abs().sum() > 0 for g in dense["grad_average"].values())
        last = torch.load(out / "checkpoints" / "seed1-undecayed-average-r02.pt", weights_only=True)
        assert last["grad_average"].keys() == dense["model"].keys()
        other = torch.load(out / "checkpoints" / "seed1-undecayed-full-r02.pt", weights_only=True)
        assert other["grad_average"] == {}

    # Round 1 of the :average arm is UP scored with the dense model's saved average.
    one = tmp_path / "one-round"
    args[args.index("--rounds") + 1] = "1"
    assert main(["-q", "study", *args, "--execution", "sequential", "--out", str(one)]) == 0
    dense = torch.load(one / "checkpoints" / "seed1-dense-r00.pt", weights_only=True)
    config = StudyConfig.from_dict(json.loads((one / "config.json").read_text()))
    study = Study(config, one, progress=False)
    data = study.check()
    model = study.new_model(1, data)
    model.load_state_dict(dense["model"])
    pruner = study.pruner(model, "undecayed:average", study.optimizer(model, 0.01), seed=0)
    pruner.prune(config.fraction, gradients={n: dense["grad_average"][n] for n in pruner.params})
    first = torch.load(one / "checkpoints" / "seed1-undecayed-average-r01.pt", weights_only=True)
    assert pruner.masks.keys() == first["masks"].keys()
    assert all(torch.equal(pruner.masks[n], first["masks"][n]) for n in pruner.masks)
    # How many batches each estimate scores with.
    batches = -(-len(data.y_train) // config.batch_size)
    assert len(study.scoring_batches(0, "undecayed:full", 1, data)) == batches
    assert len(study.scoring_batches(0, "undecayed:2", 1, data)) == 2
    assert len(study.scoring_batches(0, "undecayed", 1, data)) == config.n_batches


@pytest.mark.parametrize(
    ("arm", "message"),
    [
        ("magnitude:2", "only gradient, undecayed, undecayed-balanced take a gradient estimate"),
        ("undecayed:0", "must be a number of batches"),
        ("undecayed:some", "must be a number of batches"),
        ("lottery", "the criterion must be one of"),
    ],
)
def test_gradient_estimates_refused(tmp_path, capsys, arm, message):
    out = tmp_path / "out"
    assert main(["-q", "study", *TINY, "--criteria", arm, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_the_last_epochs_gradient_average():
    from recallprune.study.training import grad_averages, last_epoch_average

    weight = nn.Parameter(torch.zeros(3))
    optimizer = UndecayedSGD([weight], lr=0.0, track_grad_avg=True)
    restart = last_epoch_average(optimizer, epochs=3)
    seen = []
    for epoch in range(3):
        for step in range(2):
            weight.grad = torch.full((3,), float(10 * epoch + step))
            seen.append(weight.grad.clone())
            optimizer.step()
        restart(epoch + 1)
    average = grad_averages(optimizer, {"weight": weight})["weight"]
    torch.testing.assert_close(average, torch.stack(seen[-2:]).mean(0))


def _graph_training_twins(name, device):
    """Two identical stacks with masks, each with its optimizer (gradient average tracked),
    cosine schedule and last-epoch restart of the average; and the data."""
    from recallprune.study.datasets import Dataset
    from recallprune.study.training import last_epoch_average

    torch.manual_seed(5)
    models = [build_model(name, (1, 8, 8), 10) for _ in range(4)]
    x = torch.randn(200, 1, 8, 8)
    y = torch.randint(0, 10, (200,))
    data = Dataset("toy", x, y, x[:10], y[:10], 10, "toy")
    twins = []
    for _ in range(2):
        stacked = stack_models(models).to(device)
        optimizer = UndecayedSGD(
            decay_param_groups(stacked, 5e-4), lr=0.05, momentum=0.9, track_grad_avg=True
        )
        generator = torch.Generator().manual_seed(0)
        for p in stacked.parameters():
            optimizer.set_mask(p, (torch.rand(p.shape, generator=generator) > 0.3).to(device))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 4)
        twins.append((stacked, optimizer, scheduler, last_epoch_average(optimizer, 4)))
    return twins, data


def _train(twin, data, device, graphs):
    stacked, optimizer, scheduler, restart = twin
    generators = [torch.Generator().manual_seed(s) for s in range(4)]
    return grid.train_stacked(
        stacked, optimizer, data, 4, 32, device, generators, scheduler, restart, graphs=graphs
    )


@requires_cuda
@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("where", ["cuda", "cuda:last"])
def test_cuda_graph_training_equals_eager_training(name, where, monkeypatch):
    # "cuda:last": the last GPU by its index, which the capture must use whichever is current.
    last = f"cuda:{torch.cuda.device_count() - 1}" if torch.cuda.is_available() else "cuda"
    device = torch.device(last if where == "cuda:last" else where)
    (eager, graphed), data = _graph_training_twins(name, device)
    eager_losses = _train(eager, data, device, graphs=False)
    calls = []
    step = grid.stacked_step
    monkeypatch.setattr(grid, "stacked_step", lambda *a, **k: calls.append(1) or step(*a, **k))
    graphed_losses = _train(graphed, data, device, graphs=True)
    # 4 epochs of 6 full steps and a tail of 8 samples: 3 warm-up steps, 1 capture, 4 tails
    # run eagerly, and 20 full steps replayed.
    assert len(calls) == 3 + 1 + 4
    assert graphed_losses == eager_losses
    (a, a_opt, a_sched, _), (b, b_opt, b_sched, _) = eager, graphed
    assert a_sched.get_last_lr() == b_sched.get_last_lr() and a_opt.param_groups[0]["lr"] < 0.05
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), n
        assert torch.equal(a_opt.state[p]["momentum_buffer"], b_opt.state[q]["momentum_buffer"]), n
        assert torch.equal(a_opt.grad_average(p), b_opt.grad_average(q)), n
        assert torch.equal(a_opt.state[p]["grad_count"], b_opt.state[q]["grad_count"]), n
        assert torch.all(q[~b_opt.get_mask(q)] == 0), n


def test_cuda_graphs_refused_where_they_cannot_run():
    from recallprune.study.graphs import CapturedStep

    (twin, _), data = _graph_training_twins("mlp", torch.device("cpu"))
    with pytest.raises(ValueError, match="graphs=True needs a CUDA device.*got device cpu"):
        _train(twin, data, torch.device("cpu"), graphs=True)
    stacked, optimizer, _, _ = twin
    with pytest.raises(ValueError, match="and multipliers"):  # checked before any use
        grid.train_stacked(
            stacked, optimizer, data, 1, 32, "cpu", [], multipliers=object(), graphs=True
        )
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device, got cpu"):
        CapturedStep(lambda b: b, optimizer, (4, 32), torch.device("cpu"))
    if torch.cuda.is_available():
        optimizer.param_groups[0]["lr"] = torch.tensor(0.1)
        with pytest.raises(ValueError, match="lr must be a float"):
            CapturedStep(lambda b: b, optimizer, (4, 32), torch.device("cuda"))
