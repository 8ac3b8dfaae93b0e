"""The Iterative schedule's parts that a driver of many runs needs: a control round that
prunes nothing, state to resume from, and rewinding of buffers as well as weights."""

import pytest
import torch
from torch import nn

from recallprune import Iterative, Pruner, UndecayedSGD


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))


def _train(model, steps=3):
    opt = UndecayedSGD(model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=generator)
        y = torch.randint(0, 4, (8,), generator=generator)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


def test_control_round_prunes_nothing_and_rewinds_like_a_pruning_round():
    model = _model()
    schedule = Iterative(rounds=2, fraction=0.5, retrain="rewind")
    schedule.snapshot(model)
    early = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model)
    pruner = Pruner(model, "magnitude")
    schedule.control_round(pruner)
    assert schedule.round == 1 and pruner.num_pruned() == 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, early[key]), key
    schedule.control_round(pruner)
    assert schedule.done
    with pytest.raises(RuntimeError, match="all 2 rounds"):
        schedule.control_round(pruner)
    finetune = Iterative(rounds=1, fraction=0.5)
    _train(model)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    finetune.control_round(pruner)
    for key, value in model.state_dict().items():
        assert torch.equal(value, trained[key]), key


def test_rewinding_restores_normalisation_buffers_too():
    model = _model()
    schedule = Iterative(rounds=1, fraction=0.5, retrain="rewind")
    schedule.snapshot(model)
    early_mean = model[1].running_mean.clone()
    _train(model)
    assert not torch.equal(model[1].running_mean, early_mean)
    schedule.prune_round(Pruner(model, "magnitude"))
    assert torch.equal(model[1].running_mean, early_mean)


def test_resumed_schedule_continues_as_the_uninterrupted_one():
    def run(resume_after):
        model = _model()
        schedule = Iterative(rounds=3, fraction=0.4, retrain="rewind")
        schedule.snapshot(model)
        _train(model)
        pruner = Pruner(model, "magnitude")
        while not schedule.done:
            if schedule.round == resume_after:
                state = schedule.state_dict()
                schedule = Iterative(rounds=3, fraction=0.4, retrain="rewind")
                schedule.load_state_dict(state)
                assert schedule.round == resume_after
            schedule.prune_round(pruner)
            _train(model, 1)
        return {k: v.clone() for k, v in model.state_dict().items()}, pruner.num_pruned()

    (straight, pruned), (resumed, pruned_resumed) = run(None), run(1)
    assert pruned == pruned_resumed
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key


def test_load_state_dict_checks_the_round():
    schedule = Iterative(rounds=3)
    for bad, error in ((4, ValueError), (-1, ValueError), (1.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match="round"):
            schedule.load_state_dict({"round": bad, "snapshot": None})
    schedule.load_state_dict({"round": 3, "snapshot": None})
    assert schedule.done
    rewinding = Iterative(rounds=2, retrain="rewind")
    rewinding.load_state_dict({"round": 0, "snapshot": None})
    with pytest.raises(RuntimeError, match="needs snapshot"):
        rewinding.prune_round(Pruner(_model(), "magnitude"))
