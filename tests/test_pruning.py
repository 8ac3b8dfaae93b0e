"""Pruners: criteria against hand computations, exact counts, schedules, masks through
UndecayedSGD, untouched model state, torch.nn.utils.prune interop, and errors."""

import copy

import pytest
import torch
from torch import nn

from recallprune import Gradual, Iterative, OneShot, Pruner, UndecayedSGD
from recallprune.pruning import criteria, select_lowest


def _mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 12),
        nn.ReLU(),
        nn.Linear(12, 3),
    ).to(dtype)


def _batches(n=4, seed=1, batch=10):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, 8, generator=generator),
            torch.randint(0, 3, (batch,), generator=generator),
        )
        for _ in range(n)
    ]


def _reference_gradients(model, batch):
    """The authors' procedure: one batch, train mode, cross-entropy, plain autograd."""
    twin = copy.deepcopy(model).train()
    twin.zero_grad()
    nn.functional.cross_entropy(twin(batch[0]), batch[1]).backward()
    return {name: p.grad for name, p in twin.named_parameters()}


def test_undecayed_scores_equal_the_reference_procedure():
    model = _mlp()
    batch = _batches(1)[0]
    grads = _reference_gradients(model, batch)
    pruner = Pruner(model, "undecayed", lam=5e-4)
    scores = pruner.scores(data=[batch], n_batches=1)
    assert set(scores) == {"0.weight", "3.weight", "5.weight"}
    for name, p in model.named_parameters():
        if name in scores:
            w, g = p.detach(), grads[name]
            assert torch.equal(scores[name], (-w * g + 5e-4 * w**2).abs())


def test_undecayed_scores_by_hand_on_a_tiny_model():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    x, y = torch.tensor([[1.0, 1.0]]), torch.tensor([0])
    # logits = W x = [-1, 3.5]; softmax p = [e^-1, e^3.5] / sum; dL/dlogits = p - onehot(0).
    p = torch.softmax(torch.tensor([-1.0, 3.5]), 0)
    grad = torch.outer(p - torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))
    lam = 0.1
    expected = (-model.weight.detach() * grad + lam * model.weight.detach() ** 2).abs()
    scores = Pruner(model, "undecayed", lam=lam, include=[""]).scores(data=[(x, y)])
    torch.testing.assert_close(scores["weight"], expected, rtol=1e-6, atol=1e-7)
    gradient = Pruner(model, "gradient", include=[""]).scores(data=[(x, y)])
    torch.testing.assert_close(gradient["weight"], (model.weight.detach() * grad).abs())
    magnitude = Pruner(model, "magnitude", include=[""]).scores()
    assert torch.equal(magnitude["weight"], torch.tensor([[1.0, 2.0], [0.5, 3.0]]))


def test_undecayed_ranks_like_magnitude_at_a_stationary_point():
    generator = torch.Generator().manual_seed(2)
    w = torch.randn(5000, generator=generator)
    lam = 5e-4
    up = criteria.undecayed_score(w, -lam * w, lam)  # g = -lam * w
    torch.testing.assert_close(up, 2 * lam * w * w)
    for count in (1, 100, 2500, 4999):
        assert torch.equal(
            select_lowest(up, count), select_lowest(criteria.magnitude_score(w), count)
        )
    # Away from it, the rankings differ.
    noisy = criteria.undecayed_score(w, torch.randn(5000, generator=generator), lam)
    assert not torch.equal(select_lowest(noisy, 2500), select_lowest(w.abs(), 2500))


def test_lam_comes_from_the_optimizer_group():
    model = _mlp()
    opt = UndecayedSGD(
        [
            {"params": model[0].parameters(), "weight_decay": 1e-3},
            {
                "params": list(model[3].parameters()) + list(model[5].parameters()),
                "weight_decay": 0.0,
            },
            {"params": model[1].parameters()},
        ],
        lr=0.1,
        weight_decay=5e-4,
    )
    pruner = Pruner(model, "undecayed", optimizer=opt)
    assert pruner._lam_for(model[0].weight) == 1e-3
    assert pruner._lam_for(model[5].weight) == 0.0
    with pytest.raises(ValueError, match="needs lam"):
        Pruner(model, "undecayed").scores(data=_batches(1))


def test_gradients_from_the_optimizer_average():
    model = nn.Linear(4, 3)
    opt = UndecayedSGD(model.parameters(), lr=0.0, weight_decay=0.1, track_grad_avg=True)
    seen = []
    for x, y in _batches(3, batch=6):
        x = x[:, :4]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        seen.append(model.weight.grad.clone())
        opt.step()
    pruner = Pruner(model, "undecayed", optimizer=opt)
    scores = pruner.scores(grad_source="average")
    g = torch.stack(seen).mean(0)
    w = model.weight.detach()
    torch.testing.assert_close(scores["weight"], (-w * g + 0.1 * w * w).abs(), rtol=1e-5, atol=1e-8)


def test_gradients_given_by_name():
    model = _mlp()
    batches = _batches(2)
    pruner = Pruner(model, "undecayed", lam=0.01)
    gathered = pruner.gather_gradients(batches, n_batches=2)
    # The same gradients given: the same scores and the same masks as gathering them.
    expected = pruner.scores(data=batches, n_batches=2)
    given = pruner.scores(gradients=gathered)
    for name in expected:
        assert torch.equal(given[name], expected[name]), name
    twin = Pruner(copy.deepcopy(model), "undecayed", lam=0.01)
    assert twin.prune(0.5, gradients=gathered) == pruner.prune(0.5, data=batches, n_batches=2)
    assert all(torch.equal(twin.masks[n], pruner.masks[n]) for n in pruner.masks)
    # Other gradients give other scores: the given ones are used.
    doubled = {n: 2 * g for n, g in gathered.items()}
    assert not torch.equal(pruner.scores(gradients=doubled)["0.weight"], given["0.weight"])
    with pytest.raises(ValueError, match=r"missing \['3.weight'\]"):
        pruner.scores(gradients={k: v for k, v in gathered.items() if k != "3.weight"})
    with pytest.raises(ValueError, match=r"not pruned here \['0.bias'\]"):
        pruner.scores(gradients={**gathered, "0.bias": torch.zeros(16)})
    with pytest.raises(ValueError, match=r"gradients\['0.weight'\] must be a tensor of the "):
        pruner.scores(gradients={**gathered, "0.weight": torch.zeros(3)})


def test_gathering_gradients_leaves_the_model_as_it_was():
    model = _mlp().eval()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    Pruner(model, "gradient").scores(data=_batches(3), n_batches=3)
    assert not model.training and not any(m.training for m in model.modules())
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name
    model.train()
    Pruner(model, "gradient").scores(data=_batches(1))
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("criterion", ["magnitude", "gradient", "undecayed", "random"])
def test_exact_counts(scope, criterion):
    model = _mlp()
    pruner = Pruner(model, criterion, scope=scope, lam=5e-4, exclude=["5"])
    assert set(pruner.params) == {"0.weight", "3.weight"}
    sizes = {name: p.numel() for name, p in pruner.params.items()}
    pruner.prune(0.3, data=_batches(2), n_batches=2)
    if scope == "global":
        assert pruner.num_pruned() == round(0.3 * sum(sizes.values()))
    else:
        for name, mask in pruner.masks.items():
            assert mask.numel() - int(mask.sum()) == round(0.3 * sizes[name])
    before = {n: m.clone() for n, m in pruner.masks.items()}
    pruner.prune(0.5, data=_batches(2))
    for name, mask in pruner.masks.items():
        assert not torch.any(mask & ~before[name])  # pruned weights never come back
        assert torch.all(pruner.params[name][~mask] == 0)
    pruner.prune(sparsity=0.9, data=_batches(2))
    assert pruner.num_pruned() == round(0.9 * sum(sizes.values())) or scope == "layer"
    assert pruner.sparsity() == pytest.approx(0.9, abs=2 / sum(sizes.values()))


def test_ties_are_broken_by_position_and_regrow():
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, float("nan"), 1.0])
    assert select_lowest(scores, 4).tolist() == [True, True, True, False, True, False, False]
    assert select_lowest(scores, 7).all() and not select_lowest(scores, 0).any()
    model = nn.Linear(10, 10)
    pruner = Pruner(model, "magnitude")
    pruner.prune(sparsity=0.8)
    pruner.prune(sparsity=0.3, regrow=True)
    assert pruner.num_pruned() == 30


def test_iterative_schedule_sparsity_after_rounds():
    model = _mlp()
    pruner = Pruner(model, "magnitude")
    total = pruner.num_weights()
    schedule = Iterative(rounds=6, fraction=0.2)
    expected_pruned = 0
    while not schedule.done:
        schedule.prune_round(pruner)
        expected_pruned += round(0.2 * (total - expected_pruned))
        assert pruner.num_pruned() == expected_pruned
        assert pruner.sparsity() == pytest.approx(
            schedule.sparsity_after(schedule.round), abs=schedule.round / total
        )
    assert schedule.sparsity_after(6) == pytest.approx(1 - 0.8**6)
    with pytest.raises(RuntimeError, match="all 6 rounds"):
        schedule.prune_round(pruner)


def test_gradual_schedule_hits_its_sparsities():
    model = nn.Linear(100, 50)
    pruner = Pruner(model, "magnitude")
    schedule = Gradual(
        final_sparsity=0.8, start_step=10, end_step=50, frequency=10, initial_sparsity=0.1
    )
    hit = {}
    for step in range(60):
        if schedule.step(pruner, step):
            hit[step] = pruner.sparsity()
    assert sorted(hit) == [10, 20, 30, 40, 50]
    for step, sparsity in hit.items():
        expected = 0.8 + (0.1 - 0.8) * (1 - (step - 10) / 40) ** 3
        assert schedule.sparsity_at(step) == pytest.approx(expected)
        assert sparsity == pytest.approx(round(expected * 5000) / 5000)
    assert schedule.sparsity_at(50) == 0.8 and schedule.sparsity_at(70) == 0.8


def test_one_shot():
    pruner = Pruner(_mlp(), "random", seed=3)
    OneShot(0.75).prune(pruner)
    assert pruner.num_pruned() == round(0.75 * pruner.num_weights())


def test_training_with_undecayed_sgd_keeps_pruned_weights_and_momentum_zero():
    model = _mlp()
    opt = UndecayedSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    data = _batches(6)
    for x, y in data[:3]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    pruner = Pruner(model, "undecayed", optimizer=opt)
    pruner.prune(0.6, data=data)
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for name, p in pruner.params.items():
        mask = pruner.masks[name]
        assert torch.all(p[~mask] == 0)
        assert torch.all(opt.state[p]["momentum_buffer"][~mask] == 0)
        assert torch.equal(opt.get_mask(p), mask)


def test_rewinding_restores_early_weights_on_survivors_only():
    model = _mlp()
    opt = UndecayedSGD(model.parameters(), lr=0.1, momentum=0.9)
    schedule = Iterative(rounds=2, fraction=0.5, retrain="rewind")
    schedule.snapshot(model)
    early = {n: p.detach().clone() for n, p in model.named_parameters()}
    for x, y in _batches(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    pruner = Pruner(model, "magnitude", optimizer=opt)
    schedule.prune_round(pruner)
    for name, p in model.named_parameters():
        if name in pruner.masks:
            mask = pruner.masks[name]
            assert torch.equal(p[mask], early[name][mask])
            assert torch.all(p[~mask] == 0)
        else:
            assert torch.equal(p, early[name])
        assert "momentum_buffer" not in opt.state.get(p, {})


def test_torch_prune_round_trip_and_state_dict():
    model = _mlp()
    pruner = Pruner(model, "magnitude", exclude=["5"])
    pruner.prune(0.4)
    masks = {n: m.clone() for n, m in pruner.masks.items()}
    pruner.to_torch_prune()
    assert torch.equal(model[0].weight_mask.bool(), masks["0.weight"])
    x = torch.randn(5, 8)
    with torch.no_grad():
        out = model.eval()(x)
    back = Pruner.from_torch_prune(model)
    assert set(back.masks) == set(masks)
    for name, mask in masks.items():
        assert torch.equal(back.masks[name], mask)
    assert not hasattr(model[0], "weight_orig")
    with torch.no_grad():
        assert torch.equal(model(x), out)
    state = back.state_dict()
    fresh = Pruner(model, "magnitude", exclude=["5"])
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.masks[n], masks[n]) for n in masks)
    with pytest.raises(ValueError, match="this pruner prunes"):
        Pruner(model, "magnitude").load_state_dict(state)


def test_torch_prune_on_the_root_module():
    model = nn.Linear(8, 4)
    pruner = Pruner(model)
    assert set(pruner.params) == {"weight"}
    pruner.prune(0.5)
    mask = pruner.masks["weight"].clone()
    pruner.to_torch_prune()
    back = Pruner.from_torch_prune(model)
    assert set(back.params) == {"weight"} and back.params["weight"] is model.weight
    assert torch.equal(back.masks["weight"], mask)
    assert isinstance(model.weight, nn.Parameter) and not hasattr(model, "weight_mask")
    assert torch.all(model.weight[~mask] == 0) and back.num_pruned() == 16
    assert Pruner(model, include=[""]).params["weight"] is model.weight


def _torch_pruned_mlp():
    model = _mlp()
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.5)
    torch.nn.utils.prune.l1_unstructured(model[3], "weight", amount=0.25)
    torch.nn.utils.prune.random_unstructured(model[3], "weight", amount=0.25)  # a container
    return model


def _torch_pruning_state(model):
    return [
        (name, type(hook).__name__, {k: v.clone() for k, v in module.state_dict().items()})
        for name, module in model.named_modules()
        for hook in module._forward_pre_hooks.values()
    ]


def test_from_torch_prune_takes_over_containers_and_keeps_the_parameters():
    model = _torch_pruned_mlp()
    orig = {i: model[i].weight_orig for i in (0, 3)}
    masks = {f"{i}.weight": model[i].weight_mask.bool() for i in (0, 3)}
    opt = UndecayedSGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = Pruner.from_torch_prune(model, "magnitude", optimizer=opt)
    assert set(pruner.params) == set(masks)
    for i in (0, 3):
        assert model[i].weight is orig[i] is pruner.params[f"{i}.weight"]
        assert torch.equal(opt.get_mask(model[i].weight), masks[f"{i}.weight"])
    assert pruner.num_pruned() == 64 + 48 + 36  # the second method prunes 25% of the rest


@pytest.mark.parametrize(
    "case",
    ["bias", "soft mask", "exclude", "include", "bad argument", "bad criterion"],
)
def test_from_torch_prune_checks_before_it_removes_anything(case):
    model = _torch_pruned_mlp()
    kwargs = {}
    if case == "bias":
        torch.nn.utils.prune.l1_unstructured(model[5], "bias", amount=0.5)
        expected = "5.bias is pruned with torch.nn.utils.prune, but a Pruner prunes weights only"
    elif case == "soft mask":
        torch.nn.utils.prune.custom_from_mask(model[5], "weight", torch.full((3, 12), 0.5))
        expected = "holds values other than 0 and 1"
    elif case == "exclude":
        kwargs = {"exclude": ["3"]}
        expected = "exclude leaves out \\['3.weight'\\]"
    elif case == "include":
        kwargs = {"include": ["0"]}
        expected = "no include argument"
    elif case == "bad argument":
        kwargs = {"lam": float("nan")}
        expected = "lam must be"
    else:
        kwargs = {"scope": "local"}
        expected = "scope must be one of"
    before = _torch_pruning_state(model)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises((ValueError, TypeError), match=expected):
        Pruner.from_torch_prune(model, **kwargs)
    after = _torch_pruning_state(model)
    assert [(n, t) for n, t, _ in after] == [(n, t) for n, t, _ in before]
    for (_, _, state_after), (_, _, state_before) in zip(after, before, strict=True):
        assert state_after.keys() == state_before.keys()
        assert all(torch.equal(state_after[k], state_before[k]) for k in state_before)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_a_torch_pruned_weight_is_not_pruned_twice():
    model = _torch_pruned_mlp()
    with pytest.raises(ValueError, match="0.weight is pruned with torch.nn.utils.prune: take"):
        Pruner(model, "magnitude")
    assert set(Pruner(model, "magnitude", exclude=["0", "3"]).params) == {"5.weight"}
    with pytest.raises(ValueError, match="no module pruned with torch.nn.utils.prune"):
        Pruner.from_torch_prune(_mlp())


def test_bf16_weights():
    model = _mlp(dtype=torch.bfloat16)
    pruner = Pruner(model, "undecayed", lam=5e-4)
    batches = [(x.bfloat16(), y) for x, y in _batches(1)]
    pruner.prune(0.5, data=batches)
    assert pruner.num_pruned() == round(0.5 * pruner.num_weights())
    assert model[0].weight.dtype == torch.bfloat16


def test_global_threshold_on_a_10m_parameter_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2500, 2000), nn.Linear(2000, 2500), nn.Linear(2500, 10))
    pruner = Pruner(model, "magnitude", exclude=["2"])
    assert pruner.num_weights() == 10_000_000
    pruner.prune(0.9)
    assert pruner.num_pruned() == 9_000_000
    kept = torch.cat(
        [
            p.detach().abs()[m]
            for p, m in zip(pruner.params.values(), pruner.masks.values(), strict=True)
        ]
    )
    dropped_max = max(
        float(p.detach().abs()[~m].max())
        for p, m in zip(pruner.params.values(), pruner.masks.values(), strict=True)
    )
    assert float(kept.min()) >= dropped_max  # one global threshold


class TestErrors:
    def test_amounts(self):
        pruner = Pruner(_mlp(), "magnitude")
        for bad in (-0.1, 1.5, float("nan")):
            with pytest.raises(ValueError, match="amount must be a number in \\[0, 1\\]"):
                pruner.prune(bad)
        with pytest.raises(ValueError, match="exactly one of amount"):
            pruner.prune(0.1, sparsity=0.2)

    def test_names_and_models(self):
        with pytest.raises(
            ValueError, match="exclude: no module of the model is named or matches 'fc9'"
        ):
            Pruner(_mlp(), "magnitude", exclude=["fc9"])
        with pytest.raises(ValueError, match="nothing to prune"):
            Pruner(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), "magnitude")
        with pytest.raises(ValueError, match="nothing to prune"):
            Pruner(nn.Linear(3, 3), "magnitude", exclude=["*"])
        with pytest.raises(ValueError, match="criterion must be one of"):
            Pruner(_mlp(), "taylor")
        with pytest.raises(ValueError, match="scope must be one of"):
            Pruner(_mlp(), "magnitude", scope="local")

    def test_a_bare_string_is_not_a_list_of_names(self):
        model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(12)])
        for what in ("exclude", "include"):
            with pytest.raises(TypeError, match=f"write {what}=\\['11'\\]"):
                Pruner(model, "magnitude", **{what: "11"})
        with pytest.raises(TypeError, match="names and patterns are strings, got 11"):
            Pruner(model, "magnitude", exclude=[11])
        with pytest.raises(TypeError, match="exclude must be a list"):
            Pruner(model, "magnitude", exclude=11)
        with pytest.raises(TypeError, match="layer_types must be subclasses"):
            Pruner(model, "magnitude", layer_types=["Linear"])
        pruner = Pruner(model, "magnitude", exclude=["11"])
        assert "11.weight" not in pruner.params and "1.weight" in pruner.params

    @pytest.mark.parametrize("lam", [float("nan"), float("inf"), -1e-4, "5e-4", True])
    def test_lam_must_be_a_finite_non_negative_number(self, lam):
        with pytest.raises(ValueError, match="lam must be a finite non-negative number"):
            Pruner(_mlp(), "undecayed", lam=lam)
        w = torch.ones(3)
        with pytest.raises(ValueError, match="lam must be a finite non-negative number"):
            criteria.score("undecayed", w, torch.ones(3), lam)

    def test_lam_from_the_optimizer_is_checked_too(self):
        model = _mlp()
        assert Pruner(model, "undecayed", lam=0).lam == 0.0
        # torch.optim.SGD accepts weight_decay=nan (its check is weight_decay < 0).
        opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=float("nan"))
        pruner = Pruner(model, "undecayed", optimizer=opt)
        with pytest.raises(ValueError, match="lam must be a finite non-negative number"):
            pruner.prune(0.5, data=_batches(1))
        assert pruner.num_pruned() == 0

    def test_other_arguments(self):
        with pytest.raises(TypeError, match="seed must be an integer"):
            Pruner(_mlp(), "random", seed=1.5)
        with pytest.raises(TypeError, match="loss_fn must be callable"):
            Pruner(_mlp(), "gradient", loss_fn="cross_entropy")
        with pytest.raises(ValueError, match="amount must be a number"):
            Pruner(_mlp(), "magnitude").prune(True)

    def test_biases_are_not_pruned(self):
        with pytest.raises(ValueError, match="prunes weights only, never biases"):
            Pruner(_mlp(), "magnitude", include=["0.bias"])

    def test_gradient_criteria_need_data(self):
        with pytest.raises(ValueError, match="needs gradients: pass data="):
            Pruner(_mlp(), "gradient").prune(0.1)
        with pytest.raises(ValueError, match="needs an attached UndecayedSGD"):
            Pruner(_mlp(), "gradient").prune(0.1, grad_source="average")


# -- masks that hold under any optimizer ------------------------------------------------------

OPTIMIZERS = {
    "SGD": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "SGD momentum+decay": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-4),
    "SGD nesterov foreach": lambda ps: torch.optim.SGD(
        ps, lr=0.1, momentum=0.9, nesterov=True, foreach=True
    ),
    "Adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "Adam amsgrad+decay": lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=1e-3, amsgrad=True),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    "RMSprop momentum": lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.9),
    "Adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1),
    "NAdam": lambda ps: torch.optim.NAdam(ps, lr=0.01),
    "Rprop": lambda ps: torch.optim.Rprop(ps, lr=0.01),
}


def _train(model, opt, batches, after_step=None):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if after_step is not None:
            after_step()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_pruned_weights_stay_zero_under_any_optimizer(name):
    model = _mlp()
    opt = OPTIMIZERS[name](model.parameters())
    _train(model, opt, _batches(2))  # the optimizer has state before the pruning
    pruner = Pruner(model, "magnitude", optimizer=opt)
    pruner.prune(0.5)
    before = {n: p.detach().clone() for n, p in pruner.params.items()}

    def check():
        for n, p in pruner.params.items():
            assert torch.count_nonzero(p[~pruner.masks[n]]) == 0, n

    _train(model, opt, _batches(4, seed=2), after_step=check)
    moved = [n for n, p in pruner.params.items() if not torch.equal(p, before[n])]
    assert moved == list(pruner.params)  # the kept weights did train
    pruner.prune(0.5)  # re-pruning: the hook holds the new masks
    assert pruner.num_pruned() == round(0.75 * pruner.num_weights())
    _train(model, opt, _batches(3, seed=3), after_step=check)


def test_without_the_pruners_optimizer_the_weights_regrow():
    """The failure the hook prevents: nothing else holds them."""
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    pruner = Pruner(model, "magnitude")
    pruner.prune(0.5)
    _train(model, opt, _batches(3))
    pruned = torch.cat([p[~pruner.masks[n]] for n, p in pruner.params.items()])
    assert torch.count_nonzero(pruned) == pruned.numel()


def test_the_hook_trains_the_kept_weights_as_undecayed_sgd_does():
    """A pruned element's momentum moves only its own weight, so SGD with the hook leaves the
    kept weights where UndecayedSGD's masked update puts them."""
    models = [_mlp(), _mlp()]
    opts = [
        torch.optim.SGD(models[0].parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3),
        UndecayedSGD(
            models[1].parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3, backend="reference"
        ),
    ]
    for model, opt in zip(models, opts, strict=True):
        _train(model, opt, _batches(2))
        Pruner(model, "magnitude", optimizer=opt).prune(0.6)
        _train(model, opt, _batches(5, seed=4))
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b), name


def _post_hooks(opt):
    return len(opt._optimizer_step_post_hooks)


def test_one_hook_per_optimizer_for_as_long_as_something_is_pruned():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    first = Pruner(model, "magnitude", optimizer=opt)
    assert _post_hooks(opt) == 0  # nothing pruned yet: no hook, no cost
    first.prune(0.5)
    assert _post_hooks(opt) == 1
    second = Pruner(model, "magnitude", optimizer=opt)  # sees the masks held for opt
    assert all(torch.equal(second.masks[n], first.masks[n]) for n in first.masks)
    second.prune(0.5)
    assert _post_hooks(opt) == 1 and second.num_pruned() == round(0.75 * second.num_weights())
    second.prune(sparsity=0.0, regrow=True)  # every mask cleared: the hook goes
    assert _post_hooks(opt) == 0
    second.load_state_dict(first.state_dict())  # masks back: the hook too
    assert _post_hooks(opt) == 1
    second.remove()
    assert _post_hooks(opt) == 0
    _train(model, opt, _batches(2))
    pruned = torch.cat([p[~second.masks[n]] for n, p in second.params.items()])
    assert torch.count_nonzero(pruned) == pruned.numel()  # removed: they regrow
    second.apply()
    assert _post_hooks(opt) == 1
    assert torch.count_nonzero(model[0].weight) == int(second.masks["0.weight"].sum())


def test_removing_some_weights_keeps_the_hook_for_the_others():
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    first = Pruner(model, "magnitude", include=["0"], optimizer=opt)
    first.prune(0.5)
    last = Pruner(model, "magnitude", include=["5"], optimizer=opt)
    last.prune(0.5)
    first.remove()
    assert _post_hooks(opt) == 1
    _train(model, opt, _batches(2))
    assert torch.count_nonzero(model[0].weight) == model[0].weight.numel()
    assert torch.count_nonzero(model[5].weight) == 18


def test_the_hook_goes_with_its_optimizer():
    import gc
    import weakref

    from recallprune.pruning import step_masks

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = Pruner(model, "magnitude", optimizer=opt)
    pruner.prune(0.5)
    holder = weakref.ref(step_masks._HOLDERS[opt])
    del opt, pruner
    gc.collect()
    assert holder() is None and len(step_masks._HOLDERS) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_the_hook_writes_positive_zeros_over_nan_and_inf(dtype):
    weight = nn.Parameter(torch.randn(4, 6).to(dtype))
    model = nn.Sequential(nn.Linear(6, 4))
    model[0].weight = weight
    opt = torch.optim.SGD([weight], lr=0.0)
    keep = torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) > 0.5
    pruner = Pruner(model, "magnitude", optimizer=opt)
    pruner.masks["0.weight"] = keep
    pruner.apply()
    kept = weight.detach()[keep].clone()
    with torch.no_grad():
        weight[~keep] = (
            torch.tensor([float("nan"), float("inf"), -1.0])
            .to(dtype)
            .repeat(8)[: int((~keep).sum())]
        )
    weight.grad = torch.zeros_like(weight)
    opt.step()
    assert torch.equal(weight.detach()[keep], kept)
    zeros = weight.detach()[~keep]
    assert torch.all(zeros == 0) and not torch.any(torch.signbit(zeros))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_hook_on_cuda():
    model = _mlp().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    pruner = Pruner(model, "magnitude", optimizer=opt)
    pruner.prune(0.5)
    _train(model, opt, [(x.cuda(), y.cuda()) for x, y in _batches(3)])
    for n, p in pruner.params.items():
        assert torch.count_nonzero(p[~pruner.masks[n]]) == 0


def test_optimizer_errors():
    model = _mlp()
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        Pruner(model, "magnitude", optimizer=object())
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.raises(
        ValueError, match="the optimizer does not hold \\['3.weight', '5.weight'\\]"
    ):
        Pruner(model, "magnitude", optimizer=opt)
    assert set(Pruner(model, "magnitude", include=["0"], optimizer=opt).params) == {"0.weight"}


def _stacked_case(seed):
    """Scores with many ties, some NaN and infinite ones, random candidates and counts
    (none, some, all, more than there are)."""
    generator = torch.Generator().manual_seed(seed)
    rows, n = 7, 60
    scores = torch.randint(0, 6, (rows, n), generator=generator).float()
    scores[torch.rand(rows, n, generator=generator) < 0.1] = float("nan")
    scores[torch.rand(rows, n, generator=generator) < 0.05] = float("inf")
    scores[torch.rand(rows, n, generator=generator) < 0.05] = -float("inf")
    kept = torch.rand(rows, n, generator=generator) < 0.7
    kept[0] = False  # no candidate at all
    counts = torch.randint(0, n + 5, (rows,), generator=generator).tolist()
    candidates = kept.sum(dim=1).tolist()
    counts[1] = 0
    counts[2] = max(candidates[2] - 1, 1)  # the threshold among the NaN and inf scores
    counts[3] = candidates[3]
    counts[4] = 3
    counts[5] = 3  # two rows of one count: one kthvalue for both
    return scores, kept, counts


@pytest.mark.parametrize("seed", range(12))
def test_stacked_selection_is_each_rows_own(seed):
    from recallprune.pruning import select_lowest_stacked

    scores, kept, counts = _stacked_case(seed)
    selected = select_lowest_stacked(scores, kept, counts)
    assert not (selected & ~kept).any()
    for row in range(len(counts)):
        expected = torch.zeros_like(kept[row])
        expected[kept[row]] = select_lowest(scores[row][kept[row]], counts[row])
        assert torch.equal(selected[row], expected), row
        assert int(selected[row].sum()) == min(counts[row], int(kept[row].sum()))


def test_stacked_selection_refuses_bad_input():
    from recallprune.pruning import select_lowest_stacked

    scores = torch.zeros(2, 5)
    with pytest.raises(
        ValueError, match=r"bool kept mask of its shape, got \[2, 5\] and torch.float32"
    ):
        select_lowest_stacked(scores, torch.ones(2, 5), [1, 1])
    with pytest.raises(ValueError, match=r"scores \[B, N\].*got \[5\]"):
        select_lowest_stacked(torch.zeros(5), torch.ones(5, dtype=torch.bool), [1])
    with pytest.raises(ValueError, match="one count per row, got 1 for 2"):
        select_lowest_stacked(scores, torch.ones(2, 5, dtype=torch.bool), [1])


def _pruners(criteria_names, scope, seed=0):
    torch.manual_seed(seed)
    models = [nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 4)) for _ in criteria_names]
    for model in models:  # ties across and within layers
        model[0].weight.data = (model[0].weight.data * 8).round() / 8
    return [
        Pruner(m, c, scope=scope, lam=1e-2, seed=i)
        for i, (m, c) in enumerate(zip(models, criteria_names, strict=True))
    ]


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_pruning_together_equals_pruning_one_by_one(scope):
    from recallprune.pruning import prune_together

    names = ["magnitude", "random", "gradient", "undecayed", "magnitude"]
    together, alone = _pruners(names, scope), _pruners(names, scope)
    generator = torch.Generator().manual_seed(1)
    for round_index in range(4):
        gradients = [
            {n: torch.randn(p.shape, generator=generator) for n, p in pruner.params.items()}
            if pruner.criterion in ("gradient", "undecayed")
            else None
            for pruner in together
        ]
        counts = prune_together(together, 0.3, gradients)
        for i, pruner in enumerate(alone):
            assert pruner.prune(amount=0.3, gradients=gradients[i]) == counts[i]
        for a, b in zip(together, alone, strict=True):
            assert a.masks.keys() == b.masks.keys()
            for name in a.masks:
                assert torch.equal(a.masks[name], b.masks[name]), (round_index, name)
                assert torch.equal(a.params[name], b.params[name]), (round_index, name)
    assert together[0].sparsity() > 0.7


def test_pruning_together_refuses_pruners_that_differ():
    from recallprune.pruning import prune_together

    pruners = _pruners(["magnitude", "magnitude"], "global")
    with pytest.raises(ValueError, match="amount must be a number in"):
        prune_together(pruners, 1.5)
    with pytest.raises(ValueError, match="one entry per pruner, got 1 for 2"):
        prune_together(pruners, 0.5, [None])
    other = Pruner(nn.Sequential(nn.Linear(12, 21)), "magnitude")
    with pytest.raises(ValueError, match="same names and shapes with the same scope"):
        prune_together([pruners[0], other], 0.5)
    layer = _pruners(["magnitude"], "layer")[0]
    with pytest.raises(ValueError, match="same names and shapes with the same scope"):
        prune_together([pruners[0], layer], 0.5)
    assert prune_together([], 0.5) == []
