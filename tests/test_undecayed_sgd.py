"""UndecayedSGD: bit-identity with torch.optim.SGD, kernels against the reference, masks,
decay suppression, gradient averages, AMP, checkpoints and errors."""

import collections
import copy
import itertools
import warnings
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from recallprune import UndecayedSGD, decay_param_groups
from recallprune.ops.reference import undecayed_sgd_reference

SGD_CONFIGS = [
    dict(momentum=m, dampening=d, nesterov=n, maximize=mx, weight_decay=wd)
    for m, d, n, mx, wd in itertools.product(
        (0.0, 0.9), (0.0, 0.3), (False, True), (False, True), (0.0, 1e-2)
    )
    if not (n and (m == 0 or d != 0))
]


def _config_id(config):
    return "-".join(f"{k}={v}" for k, v in config.items())


def _make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(13, 31), nn.BatchNorm1d(31), nn.ReLU(), nn.Linear(31, 7), nn.Linear(7, 3)
    )


def _groups(model, lr_scale=1.0):
    first, second, third = model[0], model[1], model[3:]
    return [
        {"params": list(first.parameters())},
        {"params": list(second.parameters()), "lr": 0.05 * lr_scale, "weight_decay": 0.0},
        {"params": list(third.parameters()), "lr": 0.2 * lr_scale},
    ]


def _set_grads(models, step, generator):
    """The same random gradients on every model (drawn on the CPU, copied to each model's
    device); one parameter has no gradient now and then."""
    for params in zip(*(m.parameters() for m in models), strict=True):
        grad = torch.randn(params[0].shape, generator=generator)
        for p in params:
            p.grad = grad.to(p.device, copy=True)
    if step % 3 == 1:
        for m in models:
            m[3].bias.grad = None


@pytest.mark.parametrize("config", SGD_CONFIGS, ids=_config_id)
def test_reference_bit_identical_to_torch_sgd(config):
    torch_model, ours_model = _make_model(), _make_model()
    lr = 0.1
    torch_opt = torch.optim.SGD(_groups(torch_model), lr=lr, foreach=False, **config)
    ours_opt = UndecayedSGD(_groups(ours_model), lr=lr, backend="reference", **config)
    torch_sched = torch.optim.lr_scheduler.StepLR(torch_opt, step_size=4, gamma=0.5)
    ours_sched = torch.optim.lr_scheduler.StepLR(ours_opt, step_size=4, gamma=0.5)
    generator = torch.Generator().manual_seed(1)
    for step in range(12):
        _set_grads([torch_model, ours_model], step, generator)
        torch_opt.step()
        ours_opt.step()
        torch_sched.step()
        ours_sched.step()
        for p, q in zip(torch_model.parameters(), ours_model.parameters(), strict=True):
            assert torch.equal(p, q), f"step {step}"
        if step == 5:
            # A state_dict round trip mid-training, into a fresh optimizer.
            saved = copy.deepcopy(ours_opt.state_dict())
            ours_opt = UndecayedSGD(_groups(ours_model), lr=lr, backend="reference", **config)
            ours_opt.load_state_dict(saved)
            ours_sched = torch.optim.lr_scheduler.StepLR(ours_opt, step_size=4, gamma=0.5)
            ours_sched.load_state_dict(torch_sched.state_dict())
    torch_state, ours_state = torch_opt.state_dict(), ours_opt.state_dict()
    assert torch_state["state"].keys() == ours_state["state"].keys()
    for key, state in torch_state["state"].items():
        assert state.keys() == ours_state["state"][key].keys()
        for name, value in state.items():
            assert torch.equal(value, ours_state["state"][key][name])


@pytest.mark.parametrize("config", SGD_CONFIGS, ids=_config_id)
def test_kernel_matches_reference(kernel_device, config):
    reference_model = _make_model().to(kernel_device)
    kernel_model = _make_model().to(kernel_device)
    reference_opt = UndecayedSGD(_groups(reference_model), lr=0.1, backend="reference", **config)
    kernel_opt = UndecayedSGD(_groups(kernel_model), lr=0.1, backend="kernel", **config)
    generator = torch.Generator().manual_seed(2)
    for step in range(10):
        _set_grads([reference_model, kernel_model], step, generator)
        reference_opt.step()
        kernel_opt.step()
    for p, q in zip(reference_model.parameters(), kernel_model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        if config["momentum"]:
            torch.testing.assert_close(
                kernel_opt.state[q]["momentum_buffer"],
                reference_opt.state[p]["momentum_buffer"],
                rtol=1e-5,
                atol=1e-6,
            )


def _random_step_inputs(shapes, dtype, device, density, seed, with_decay_mask):
    generator = torch.Generator().manual_seed(seed)

    def rand(shape):
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)

    params = [rand(s) for s in shapes]
    keeps = [torch.rand(s, generator=generator).to(device) < density for s in shapes]
    decays = [
        (torch.rand(s, generator=generator).to(device) < 0.5) if with_decay_mask else None
        for s in shapes
    ]
    for p, k in zip(params, keeps, strict=True):
        p.masked_fill_(~k, 0)
    return params, keeps, decays, rand


def _run_both(shapes, dtype, device, density, steps, hyper, seed=0, with_decay_mask=True):
    """Run the reference and the kernel (via the op) on the same inputs; return both states."""
    params, keeps, decays, rand = _random_step_inputs(
        shapes, dtype, device, density, seed, with_decay_mask
    )
    sum_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    results = {}
    all_grads = [[rand(s) for s in shapes] for _ in range(steps)]
    for backend in ("reference", "kernel"):
        ps = [p.clone() for p in params]
        bufs = [None] * len(ps)
        sums = [torch.zeros(s, dtype=sum_dtype, device=device) for s in shapes]
        for grads in all_grads:
            from recallprune.optim.functional import undecayed_sgd

            undecayed_sgd(ps, grads, bufs, keeps, decays, sums, backend=backend, **hyper)
        results[backend] = (ps, bufs, sums)
    return results, keeps


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=5),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    nesterov=st.booleans(),
    maximize=st.booleans(),
    weight_decay=st.sampled_from([0.0, 1e-3, 0.1]),
    density=st.floats(0.0, 1.0),
    steps=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_kernel_property_against_reference(
    sizes, momentum, nesterov, maximize, weight_decay, density, steps, seed
):
    pytest.importorskip("recallprune._C")
    hyper = dict(
        lr=0.05,
        momentum=momentum,
        dampening=0.0,
        weight_decay=weight_decay,
        nesterov=nesterov and momentum > 0,
        maximize=maximize,
    )
    results, keeps = _run_both(
        [(n,) for n in sizes], torch.float32, "cpu", density, steps, hyper, seed
    )
    ref_params, ref_bufs, ref_sums = results["reference"]
    ker_params, ker_bufs, ker_sums = results["kernel"]
    for ref, ker in zip(ref_params + ref_sums, ker_params + ker_sums, strict=True):
        torch.testing.assert_close(ker, ref, rtol=1e-5, atol=1e-6)
    for ref, ker in zip(ref_bufs, ker_bufs, strict=True):
        if momentum == 0:
            assert ref is None and ker is None
        else:
            torch.testing.assert_close(ker, ref, rtol=1e-5, atol=1e-6)
    for (ps, bufs, _), keep in itertools.product(results.values(), [keeps]):
        for p, buf, k in zip(ps, bufs, keep, strict=True):
            assert torch.all(p[~k] == 0)
            if buf is not None:
                assert torch.all(buf[~k] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shapes", [[(1,)], [(7, 3), (0,), (1025,)], [(3, 5, 7), (100_003,)]])
def test_kernel_dtypes_and_odd_sizes(kernel_device, dtype, shapes):
    hyper = dict(
        lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=False, maximize=False
    )
    results, keeps = _run_both(shapes, dtype, kernel_device, 0.6, 3, hyper)
    # The reference rounds to the parameter dtype after every op; the kernel once per step.
    tol = {
        torch.float32: dict(rtol=1e-5, atol=1e-6),
        torch.float64: dict(rtol=1e-12, atol=1e-12),
        torch.float16: dict(rtol=4e-3, atol=4e-3),
        torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
    }[dtype]
    for a, b in zip(results["reference"][0], results["kernel"][0], strict=True):
        assert b.dtype == dtype
        torch.testing.assert_close(b, a, **tol)
    for a, b in zip(results["reference"][2], results["kernel"][2], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    for p, k in zip(results["kernel"][0], keeps, strict=True):
        assert torch.all(p[~k] == 0)


def test_kernel_misaligned_and_noncontiguous(kernel_device):
    storage = torch.randn(2001, device=kernel_device)
    misaligned = nn.Parameter(storage[1:1001].view(40, 25))  # offset by one element
    transposed = nn.Parameter(torch.randn(30, 20, device=kernel_device).t())  # not contiguous
    plain = nn.Parameter(torch.randn(333, device=kernel_device))
    params = [misaligned, transposed, plain]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    kernel_opt = UndecayedSGD(params, lr=0.1, momentum=0.9, weight_decay=0.01, backend="kernel")
    reference_opt = UndecayedSGD(
        twins, lr=0.1, momentum=0.9, weight_decay=0.01, backend="reference"
    )
    keep = torch.rand(40, 25, device=kernel_device) > 0.5
    kernel_opt.set_mask(misaligned, keep)
    reference_opt.set_mask(twins[0], keep)
    generator = torch.Generator().manual_seed(3)
    for _ in range(4):
        for p, q in zip(params, twins, strict=True):
            grad = torch.randn(p.shape, generator=generator).to(kernel_device)
            p.grad = grad.t().contiguous().t() if p is plain else grad  # a strided-free grad
            q.grad = grad.clone()
        kernel_opt.step()
        reference_opt.step()
    for p, q in zip(params, twins, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert torch.all(misaligned[~keep] == 0)


@pytest.mark.parametrize("backend", ["reference", "kernel"])
def test_pruned_entries_stay_exactly_zero(backend):
    if backend == "kernel":
        pytest.importorskip("recallprune._C")
    model = _make_model()
    opt = UndecayedSGD(
        model.parameters(),
        lr=0.1,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-3,
        backend=backend,
    )
    generator = torch.Generator().manual_seed(4)
    masks = {}
    for p in model.parameters():
        masks[p] = torch.rand(p.shape, generator=generator) > 0.5
    _set_grads([model], 0, generator)
    opt.step()  # momentum exists before the masks: set_mask must zero it too
    for p, keep in masks.items():
        opt.set_mask(p, keep)
        assert torch.all(p[~keep] == 0)
        assert torch.all(opt.state[p]["momentum_buffer"][~keep] == 0)
    for step in range(6):
        _set_grads([model], step, generator)
        for p in model.parameters():
            if p.grad is not None:
                p.grad[~masks[p]] = float("nan")  # pruned gradients must not leak in
        opt.step()
        for p, keep in masks.items():
            assert torch.all(p[~keep] == 0), f"step {step}"
            assert torch.all(opt.state[p]["momentum_buffer"][~keep] == 0)
            assert torch.isfinite(p).all()
            assert p[keep].ne(0).any()


@pytest.mark.parametrize("backend", ["reference", "kernel"])
def test_decay_mask_suppresses_decay_exactly_where_asked(backend):
    if backend == "kernel":
        pytest.importorskip("recallprune._C")
    torch.manual_seed(5)
    w = nn.Parameter(torch.randn(1000))
    start = w.detach().clone()
    decay = torch.rand(1000) > 0.3
    opt = UndecayedSGD([w], lr=0.5, weight_decay=0.1, backend=backend)
    opt.set_decay_mask(w, decay)
    w.grad = torch.zeros(1000)
    opt.step()
    # With a zero gradient only the decay moves weights: w - lr * wd * w where decayed.
    assert torch.equal(w[~decay], start[~decay])
    torch.testing.assert_close(w[decay], start[decay] * (1 - 0.5 * 0.1), rtol=1e-6, atol=0)
    opt.set_decay_mask(w, None)
    w.grad = torch.zeros(1000)
    before = w.detach().clone()
    opt.step()
    torch.testing.assert_close(w.detach(), before * (1 - 0.05), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["reference", "kernel"])
def test_grad_average_is_the_mean_of_gradients_seen(backend):
    if backend == "kernel":
        pytest.importorskip("recallprune._C")
    torch.manual_seed(6)
    w = nn.Parameter(torch.randn(257, dtype=torch.bfloat16))
    v = nn.Parameter(torch.randn(64))
    opt = UndecayedSGD(
        [w, v],
        lr=0.01,
        momentum=0.9,
        weight_decay=0.1,
        maximize=True,
        track_grad_avg=True,
        backend=backend,
    )
    seen_w, seen_v = [], []
    for step in range(7):
        w.grad = torch.randn(257, dtype=torch.bfloat16)
        seen_w.append(w.grad.float())
        if step % 2 == 0:
            v.grad = torch.randn(64)
            seen_v.append(v.grad.clone())
        else:
            v.grad = None
        opt.step()
    assert opt.state[w]["grad_sum"].dtype == torch.float32
    torch.testing.assert_close(
        opt.grad_average(w), torch.stack(seen_w).mean(0), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        opt.grad_average(v), torch.stack(seen_v).mean(0), rtol=1e-5, atol=1e-6
    )
    assert int(opt.state[v]["grad_count"]) == len(seen_v)
    # The average travels in the state_dict and keeps its float32 dtype.
    twin = UndecayedSGD(
        [nn.Parameter(w.detach().clone()), nn.Parameter(v.detach().clone())],
        lr=0.01,
        track_grad_avg=True,
    )
    twin.load_state_dict(opt.state_dict())
    twin_w = twin.param_groups[0]["params"][0]
    assert twin.state[twin_w]["grad_sum"].dtype == torch.float32
    assert torch.equal(twin.grad_average(twin_w), opt.grad_average(w))
    opt.reset_grad_average()
    assert torch.equal(opt.grad_average(w), torch.zeros(257))


def test_grad_average_skips_pruned_entries():
    w = nn.Parameter(torch.ones(10))
    opt = UndecayedSGD([w], lr=0.1, track_grad_avg=True)
    keep = torch.arange(10) < 5
    opt.set_mask(w, keep)
    for _ in range(3):
        w.grad = torch.full((10,), 2.0)
        opt.step()
    assert torch.equal(opt.grad_average(w), torch.where(keep, 2.0, 0.0))


def test_masks_travel_in_state_dict_and_checkpoints_move_both_ways():
    model, twin = _make_model(), _make_model()
    opt = UndecayedSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    generator = torch.Generator().manual_seed(7)
    weight = model[0].weight
    keep = torch.rand(weight.shape, generator=generator) > 0.5
    opt.set_mask(weight, keep)
    opt.set_decay_mask(model[3].weight, torch.rand(model[3].weight.shape) > 0.5)
    for step in range(3):
        _set_grads([model], step, generator)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())

    # Into torch.optim.SGD: momentum carries over, and SGD keeps going from it.
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    sgd.load_state_dict(saved)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(sgd.state[q]["momentum_buffer"], opt.state[p]["momentum_buffer"])

    # Back into a fresh UndecayedSGD: masks keep their dtype and values.
    fresh_model = _make_model()
    fresh = UndecayedSGD(fresh_model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    fresh.load_state_dict(saved)
    fresh_keep = fresh.get_mask(fresh_model[0].weight)
    assert fresh_keep.dtype == torch.bool and torch.equal(fresh_keep, keep)
    assert torch.equal(
        fresh.get_decay_mask(fresh_model[3].weight), opt.get_decay_mask(model[3].weight)
    )
    assert torch.all(fresh_model[0].weight[~keep] == 0)

    # From torch.optim.SGD into UndecayedSGD: identical continuation (reference backend).
    a, b = _make_model(), _make_model()
    sgd = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, foreach=False)
    for step in range(3):
        _set_grads([a, b], step, generator)
        sgd.step()
    b.load_state_dict(a.state_dict())
    ours = UndecayedSGD(
        b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, backend="reference"
    )
    ours.load_state_dict(copy.deepcopy(sgd.state_dict()))
    for step in range(3):
        _set_grads([a, b], step, generator)
        sgd.step()
        ours.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sparse_gradients_with_a_keep_mask_and_averages(nesterov):
    """Sparse gradients (as nn.Embedding(sparse=True) makes them, repeated rows included)
    with a keep mask, momentum and gradient averages: the steps taken with the same gradients
    made dense, the pruned entries exactly zero, a NaN at a pruned entry ignored."""
    generator = torch.Generator().manual_seed(16)
    weight = torch.randn(12, 4, generator=generator)
    keep = torch.rand(12, 4, generator=generator) > 0.4
    pruned_row, pruned_col = (~keep).nonzero()[0].tolist()
    hyper = dict(lr=0.1, momentum=0.9, nesterov=nesterov, track_grad_avg=True)
    sparse_w, dense_w = nn.Parameter(weight.clone()), nn.Parameter(weight.clone())
    sparse_opt = UndecayedSGD([sparse_w], **hyper)  # "auto": the reference takes sparse ones
    dense_opt = UndecayedSGD([dense_w], **hyper, backend="reference")
    sparse_opt.set_mask(sparse_w, keep)
    dense_opt.set_mask(dense_w, keep)
    for _ in range(4):
        rows = torch.cat([torch.randint(0, 12, (6,), generator=generator), torch.tensor([3, 3])])
        values = torch.randn(8, 4, generator=generator)
        rows[0], values[0, pruned_col] = pruned_row, float("nan")
        grad = torch.sparse_coo_tensor(rows[None], values, (12, 4), check_invariants=True)
        sparse_w.grad, dense_w.grad = grad, grad.to_dense()
        sparse_opt.step()
        dense_opt.step()
    buf = sparse_opt.state[sparse_w]["momentum_buffer"]
    assert buf.is_sparse
    torch.testing.assert_close(sparse_w, dense_w)
    torch.testing.assert_close(buf.to_dense(), dense_opt.state[dense_w]["momentum_buffer"])
    torch.testing.assert_close(sparse_opt.grad_average(sparse_w), dense_opt.grad_average(dense_w))
    assert torch.all(sparse_w[~keep] == 0) and torch.all(buf.to_dense()[~keep] == 0)
    assert torch.all(sparse_opt.grad_average(sparse_w)[~keep] == 0)
    assert torch.isfinite(sparse_w).all()


def test_a_mask_set_after_sparse_momentum_zeroes_it():
    w = nn.Parameter(torch.randn(6, 2))
    opt = UndecayedSGD([w], lr=0.1, momentum=0.9)
    grad = torch.sparse_coo_tensor([[0, 3, 5]], torch.ones(3, 2), (6, 2), check_invariants=True)
    w.grad = grad
    opt.step()
    assert opt.state[w]["momentum_buffer"].is_sparse
    keep = torch.ones(6, 2, dtype=torch.bool)
    keep[3] = False
    opt.set_mask(w, keep)
    assert torch.equal(opt.state[w]["momentum_buffer"].to_dense()[3], torch.zeros(2))
    w.grad = grad
    opt.step()
    assert torch.equal(w[3].detach(), torch.zeros(2))
    assert torch.equal(opt.state[w]["momentum_buffer"].to_dense()[3], torch.zeros(2))


def _masked_training(steps, generator):
    """A model and its UndecayedSGD (reference backend) with keep and decay masks and gradient
    averages, after ``steps`` steps with gradients drawn from ``generator``."""
    model = _make_model()
    opt = UndecayedSGD(
        _groups(model),
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-3,
        track_grad_avg=True,
        backend="reference",
    )
    opt.set_mask(model[0].weight, torch.rand(model[0].weight.shape, generator=generator) > 0.5)
    opt.set_mask(model[4].weight, torch.rand(model[4].weight.shape, generator=generator) > 0.3)
    opt.set_decay_mask(
        model[3].weight, torch.rand(model[3].weight.shape, generator=generator) > 0.5
    )
    for step in range(steps):
        _set_grads([model], step, generator)
        opt.step()
    return model, opt


def _assert_same_state(a, b):
    """Two optimizer state_dicts hold the same groups and the same tensors (dtypes too)."""
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for key, state in a["state"].items():
        assert state.keys() == b["state"][key].keys(), key
        for name, value in state.items():
            other = b["state"][key][name]
            assert value.dtype == other.dtype and torch.equal(value, other), (key, name)


def test_checkpoint_round_trips_through_torch_sgd_with_masks_and_averages():
    model, opt = _masked_training(3, torch.Generator().manual_seed(11))
    saved = copy.deepcopy(opt.state_dict())

    # torch.optim.SGD keeps the extra entries, cast to the parameters' dtype.
    sgd = torch.optim.SGD(_groups(_make_model()), lr=0.1, momentum=0.9, weight_decay=1e-3)
    sgd.load_state_dict(copy.deepcopy(saved))
    through_sgd = copy.deepcopy(sgd.state_dict())
    assert through_sgd["state"][0]["keep_mask"].dtype == torch.float32
    assert through_sgd["state"][0]["grad_count"].dtype == torch.float32

    twin_model = copy.deepcopy(model)
    twin = UndecayedSGD(_groups(twin_model), lr=0.1, backend="reference")
    twin.load_state_dict(through_sgd)
    _assert_same_state(twin.state_dict(), saved)
    assert twin.get_mask(twin_model[0].weight).dtype == torch.bool

    generator = torch.Generator().manual_seed(12)
    for step in range(3):
        _set_grads([model, twin_model], step, generator)
        opt.step()
        twin.step()
    for p, q in zip(model.parameters(), twin_model.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(opt.grad_average(p), twin.grad_average(q))
    _assert_same_state(twin.state_dict(), opt.state_dict())


def _set_state(key, value):
    def corrupt(state_dict):
        state_dict["state"][key[0]][key[1]] = value

    return corrupt


def _mask_with(value):
    def corrupt(state_dict):
        mask = state_dict["state"][6]["keep_mask"].float()
        mask.view(-1)[3] = value
        state_dict["state"][6]["keep_mask"] = mask

    return corrupt


def _drop(key):
    def corrupt(state_dict):
        del state_dict["state"][key[0]][key[1]]

    return corrupt


def _drop_group_param(state_dict):
    state_dict["param_groups"][2]["params"].pop()


# Parameter 6 is the last weight (model[4].weight), after the valid entries of the others.
BAD_CHECKPOINTS = {
    "mask shape": (
        _set_state((6, "keep_mask"), torch.ones(3, dtype=torch.bool)),
        "keep_mask has shape",
    ),
    "mask value 0.5": (
        _mask_with(0.5),
        r"keep_mask \(torch.float32\) holds 1 value\(s\) other than 0 and 1 \(e.g. 0.5\)",
    ),
    "mask value NaN": (_mask_with(float("nan")), "other than 0 and 1"),
    "mask value 2": (_mask_with(2.0), r"other than 0 and 1 \(e.g. 2.0\)"),
    "mask type": (
        _set_state((6, "decay_mask"), [[True] * 7] * 3),
        "decay_mask must be a tensor, got list",
    ),
    "grad_sum shape": (_set_state((6, "grad_sum"), torch.zeros(7, 3)), "grad_sum has shape"),
    "grad_sum dtype": (
        _set_state((6, "grad_sum"), torch.zeros(3, 7, dtype=torch.int64)),
        "grad_sum must be a float tensor",
    ),
    "grad_count missing": (_drop((6, "grad_count")), "has grad_sum but no grad_count"),
    "grad_count fraction": (
        _set_state((6, "grad_count"), torch.tensor(2.5)),
        "whole number of steps",
    ),
    "momentum shape": (
        _set_state((6, "momentum_buffer"), torch.zeros(21)),
        "momentum_buffer has shape",
    ),
    "group size": (_drop_group_param, "doesn't match the size of optimizer's group"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_a_failed_load_changes_nothing(case):
    corrupt, message = BAD_CHECKPOINTS[case]
    # An earlier checkpoint, so that loading it would change every entry.
    _, early = _masked_training(2, torch.Generator().manual_seed(13))
    checkpoint = copy.deepcopy(early.state_dict())
    corrupt(checkpoint)
    model, opt = _masked_training(4, torch.Generator().manual_seed(14))
    twin_model, twin = _masked_training(4, torch.Generator().manual_seed(14))
    with pytest.raises((ValueError, TypeError), match=message) as error:
        opt.load_state_dict(checkpoint)
    if case != "group size":
        assert "load_state_dict: parameter 6 (shape (3, 7))" in str(error.value)
    _assert_same_state(opt.state_dict(), twin.state_dict())
    generator = torch.Generator().manual_seed(15)
    for step in range(2):
        _set_grads([model, twin_model], step, generator)
        opt.step()
        twin.step()
    for p, q in zip(model.parameters(), twin_model.parameters(), strict=True):
        assert torch.equal(p, q)
    _assert_same_state(opt.state_dict(), twin.state_dict())


@pytest.mark.parametrize("backend", ["reference", "kernel"])
def test_amp_grad_scaler_matches_unscaled_training(backend):
    if backend == "kernel":
        pytest.importorskip("recallprune._C")
    torch.manual_seed(8)
    data, target = torch.randn(32, 13), torch.randint(0, 3, (32,))
    ours_model, torch_model = _make_model(), _make_model()
    ours = UndecayedSGD(
        ours_model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, backend=backend
    )
    assert ours._step_supports_amp_scaling
    plain = torch.optim.SGD(torch_model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for step in range(4):
        for model, opt in ((ours_model, ours), (torch_model, plain)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(data), target)
            if opt is ours:
                scaler.scale(loss).backward()
                if step == 0:
                    model[0].weight.grad[0, 0] = float("inf")  # overflow on the first step
                scaler.step(opt)
                scaler.update()
            elif step > 0:
                loss.backward()
                opt.step()
        if step == 0:
            # Nothing moved, and no uninitialised momentum was left behind.
            for p, q in zip(ours_model.parameters(), torch_model.parameters(), strict=True):
                assert torch.equal(p, q)
                buf = ours.state.get(p, {}).get("momentum_buffer")
                assert buf is None or torch.equal(buf, torch.zeros_like(buf))
    assert scaler.get_scale() == 2.0**7  # one overflow halved the scale
    for p, q in zip(ours_model.parameters(), torch_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_kernel_found_inf_skips_the_step(kernel_device):
    w = torch.randn(100, device=kernel_device)
    start = w.clone()
    buf = torch.full((100,), 7.0, device=kernel_device)
    grad_sum = torch.zeros(100, device=kernel_device)
    torch.ops.recallprune.undecayed_sgd_(
        [w],
        [torch.randn(100, device=kernel_device)],
        [buf],
        [],
        [],
        [grad_sum],
        lr=0.1,
        momentum=0.9,
        dampening=0.0,
        weight_decay=0.0,
        nesterov=False,
        maximize=False,
        is_first_step=False,
        grad_scale=torch.tensor([4.0], device=kernel_device),
        found_inf=torch.tensor([1.0], device=kernel_device),
    )
    assert torch.equal(w, start) and torch.equal(buf, torch.full_like(buf, 7.0))
    assert torch.equal(grad_sum, torch.zeros_like(grad_sum))


def test_kernel_many_tensors_and_chunks(kernel_device):
    """More tensors than one launch takes, and tensors of several 65,536-element chunks
    (whole and partial): every element is updated exactly once."""
    generator = torch.Generator().manual_seed(9)
    sizes = torch.randint(1, 5000, (130,), generator=generator).tolist()
    sizes[3], sizes[47], sizes[48], sizes[100] = 300_000, 65_536, 65_537, 131_072
    hyper = dict(
        lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=False
    )
    results, keeps = _run_both([(n,) for n in sizes], torch.float32, kernel_device, 0.7, 2, hyper)
    reference, kernel = results["reference"], results["kernel"]
    for part in range(3):  # params, momentum buffers, gradient sums
        for a, b in zip(reference[part], kernel[part], strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_decay_param_groups():
    model = _make_model()
    decayed, undecayed = decay_param_groups(model, 5e-4)
    assert decayed["weight_decay"] == 5e-4 and undecayed["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decayed["params"]) == ["0.weight", "3.weight", "4.weight"]
    assert sorted(names[id(p)] for p in undecayed["params"]) == [
        "0.bias",
        "1.bias",
        "1.weight",
        "3.bias",
        "4.bias",
    ]
    opt = UndecayedSGD(decay_param_groups(model, 5e-4), lr=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0]


def test_reference_function_is_the_oracle_for_masks():
    # Checks the reference against the update written out element by element.
    torch.manual_seed(9)
    w, g = torch.randn(50), torch.randn(50)
    keep, decay = torch.rand(50) > 0.3, torch.rand(50) > 0.5
    w = w * keep
    expected_buf = torch.where(keep, torch.where(decay, g + 0.1 * w, g), 0)
    expected_w = torch.where(keep, w - 0.5 * expected_buf, 0)
    ws, bufs = [w.clone()], [None]
    undecayed_sgd_reference(
        ws,
        [g],
        bufs,
        [keep],
        [decay],
        None,
        lr=0.5,
        momentum=0.9,
        dampening=0.0,
        weight_decay=0.1,
        nesterov=False,
        maximize=False,
    )
    torch.testing.assert_close(bufs[0], expected_buf, rtol=0, atol=1e-7)
    torch.testing.assert_close(ws[0], expected_w, rtol=0, atol=1e-7)


@pytest.fixture
def ignored_options_not_yet_warned(monkeypatch):
    from recallprune.optim import undecayed_sgd

    monkeypatch.setattr(undecayed_sgd, "_warned_options", set())


def test_foreach_and_fused_are_ignored_with_one_warning_each(ignored_options_not_yet_warned):
    w = nn.Parameter(torch.ones(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        UndecayedSGD([w], lr=0.1)
        UndecayedSGD([w], lr=0.1, foreach=None, fused=None)
    assert caught == []  # left unset: nothing to say

    with pytest.warns(UserWarning, match=r"ignores foreach=False .*backend='auto'") as record:
        UndecayedSGD([w], lr=0.1, foreach=False)
    assert len(record) == 1 and record[0].filename == __file__  # points at the caller
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        UndecayedSGD([w], lr=0.1, foreach=True)
        UndecayedSGD([{"params": [w], "foreach": True}], lr=0.1)
    assert caught == []  # once per process

    with pytest.warns(UserWarning, match="ignores fused=True") as record:
        fused = UndecayedSGD([{"params": [w], "fused": True}], lr=0.5, momentum=0.9)
    assert len(record) == 1
    assert fused.param_groups[0]["fused"] is True  # kept in the group, as SGD keeps it
    twin = nn.Parameter(torch.ones(3))
    plain = UndecayedSGD([twin], lr=0.5, momentum=0.9)
    for _ in range(2):
        w.grad, twin.grad = torch.full((3,), 2.0), torch.full((3,), 2.0)
        fused.step()
        plain.step()
    assert torch.equal(w, twin)

    # torch.optim.SGD's checks of the two still apply.
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
        UndecayedSGD([w], lr=0.1, foreach=True, fused=True)
    with pytest.raises(RuntimeError, match="`fused` does not support `differentiable`"):
        UndecayedSGD([w], lr=0.1, fused=True, differentiable=True)


class TestErrors:
    def test_sgd_validation_errors_are_the_same(self):
        w = [nn.Parameter(torch.zeros(3))]
        for kwargs in (
            dict(lr=-0.1),
            dict(momentum=-1),
            dict(weight_decay=-1),
            dict(nesterov=True),
            dict(nesterov=True, momentum=0.9, dampening=0.1),
        ):
            with pytest.raises(ValueError) as expected:
                torch.optim.SGD(w, **{"lr": 0.1, **kwargs})
            with pytest.raises(ValueError) as ours:
                UndecayedSGD(w, **{"lr": 0.1, **kwargs})
            assert str(ours.value) == str(expected.value)

    def test_bad_backend(self):
        with pytest.raises(ValueError, match="backend must be one of"):
            UndecayedSGD([nn.Parameter(torch.zeros(3))], backend="cuda")

    def test_masks_checked(self):
        w = nn.Parameter(torch.zeros(4, 5))
        opt = UndecayedSGD([w], lr=0.1)
        with pytest.raises(
            ValueError, match=r"shape \(5, 4\), expected the parameter's shape \(4, 5\)"
        ):
            opt.set_mask(w, torch.ones(5, 4, dtype=torch.bool))
        with pytest.raises(TypeError, match="expected a torch.bool mask, got torch.float32"):
            opt.set_mask(w, torch.ones(4, 5))
        with pytest.raises(ValueError, match="is on meta, expected the parameter's device cpu"):
            opt.set_decay_mask(w, torch.ones(4, 5, dtype=torch.bool, device="meta"))
        with pytest.raises(ValueError, match="not held by this optimizer"):
            opt.set_mask(nn.Parameter(torch.zeros(4, 5)), torch.ones(4, 5, dtype=torch.bool))
        with pytest.raises(TypeError, match="expected a bool tensor or None, got list"):
            opt.set_mask(w, [[True] * 5] * 4)

    def test_sparse_gradient_on_kernel_path(self):
        pytest.importorskip("recallprune._C")
        embedding = nn.Embedding(10, 3, sparse=True)
        embedding(torch.tensor([1, 2])).sum().backward()
        with pytest.raises(RuntimeError, match="sparse gradient"):
            UndecayedSGD(embedding.parameters(), lr=0.1, backend="kernel").step()
        # backend="auto" takes the reference path for it, like torch.optim.SGD.
        twin = nn.Embedding(10, 3, sparse=True)
        twin.load_state_dict(embedding.state_dict())
        twin(torch.tensor([1, 2])).sum().backward()
        UndecayedSGD(embedding.parameters(), lr=0.1).step()
        torch.optim.SGD(twin.parameters(), lr=0.1).step()
        assert torch.equal(embedding.weight, twin.weight)

    def test_op_checks_its_arguments(self):
        pytest.importorskip("recallprune._C")
        op = torch.ops.recallprune.undecayed_sgd_
        kwargs = dict(
            lr=0.1,
            momentum=0.0,
            dampening=0.0,
            weight_decay=0.0,
            nesterov=False,
            maximize=False,
            is_first_step=False,
        )
        w = torch.zeros(8)
        with pytest.raises(RuntimeError, match=r"grads\[0\] must have the parameter's shape"):
            op([w], [torch.zeros(9)], [], [], [], [], **kwargs)
        with pytest.raises(RuntimeError, match=r"keep_masks\[0\] must be bool or uint8, got Float"):
            op([w], [torch.zeros(8)], [], [torch.zeros(8)], [], [], **kwargs)
        with pytest.raises(RuntimeError, match="momentum_buffers must be empty when momentum is 0"):
            op([w], [torch.zeros(8)], [torch.zeros(8)], [], [], [], **kwargs)
        # A transposed weight is dense: its tensors must share its layout.
        with pytest.raises(RuntimeError, match=r"grads\[0\] must be a dense tensor with the "):
            op([torch.zeros(4, 2).t()], [torch.zeros(2, 4)], [], [], [], [], **kwargs)
        with pytest.raises(RuntimeError, match=r"params\[0\] must be dense and non-overlapping"):
            op([torch.zeros(4, 4)[:, ::2]], [torch.zeros(4, 4)[:, ::2]], [], [], [], [], **kwargs)
        with pytest.raises(RuntimeError, match=r"params\[0\] must be dense and non-overlapping"):
            op([torch.zeros(1).expand(4)], [torch.zeros(4)], [], [], [], [], **kwargs)
        with pytest.raises(RuntimeError, match=r"grad_sums\[0\] must be Float for a Half"):
            op([w.half()], [w.half()], [], [], [], [torch.zeros(8).half()], **kwargs)
        # Packed keep masks: one uint8 byte per eight elements.
        packed = dict(kwargs, keep_masks_packed=True)
        with pytest.raises(
            RuntimeError, match=r"packed keep_masks\[0\] must be a contiguous uint8 \[1\]"
        ):
            op([w], [torch.zeros(8)], [], [torch.zeros(8, dtype=torch.uint8)], [], [], **packed)
        with pytest.raises(
            RuntimeError, match=r"packed keep_masks\[0\] must be a contiguous uint8"
        ):
            op([w], [torch.zeros(8)], [], [torch.zeros(1, dtype=torch.bool)], [], [], **packed)

    def test_corrupt_checkpoint_mask(self):
        w = nn.Parameter(torch.zeros(4, 5))
        opt = UndecayedSGD([w], lr=0.1)
        opt.set_mask(w, torch.ones(4, 5, dtype=torch.bool))
        state = opt.state_dict()
        state["state"][0]["keep_mask"] = torch.ones(3, dtype=torch.bool)
        with pytest.raises(ValueError, match="shape"):
            UndecayedSGD([nn.Parameter(torch.zeros(4, 5))], lr=0.1).load_state_dict(state)


@pytest.mark.parametrize("backend", ["reference", "kernel"])
def test_first_step_overflow_leaves_zero_momentum(backend):
    if backend == "kernel":
        pytest.importorskip("recallprune._C")
    from recallprune.optim.functional import undecayed_sgd

    params, bufs = [torch.randn(37)], [None]
    start = params[0].clone()
    hyper = dict(
        lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.0, nesterov=False, maximize=False
    )
    grad = torch.randn(37)
    undecayed_sgd(
        params,
        [grad],
        bufs,
        [None],
        [None],
        None,
        backend=backend,
        grad_scale=torch.tensor(2.0),
        found_inf=torch.tensor(1.0),
        **hyper,
    )
    assert torch.equal(params[0], start) and torch.equal(bufs[0], torch.zeros(37))
    # Both backends then start from the zero buffer: buf = (1 - dampening) * g.
    undecayed_sgd(
        params,
        [grad],
        bufs,
        [None],
        [None],
        None,
        backend=backend,
        grad_scale=torch.tensor(2.0),
        found_inf=torch.tensor(0.0),
        **hyper,
    )
    torch.testing.assert_close(bufs[0], 0.5 * grad / 2, rtol=1e-6, atol=0)


# -- the lists a step keeps -------------------------------------------------------------------


class _Uncached(UndecayedSGD):
    """UndecayedSGD that gathers its lists afresh at every step: the oracle for kept ones."""

    def step(self, closure=None):
        self._step_lists = []
        return super().step(closure)


def _first_two_groups(model):
    return _groups(model)[:2]


def _mask_events(opt, model, step, memo):
    generator = torch.Generator().manual_seed(100 + step)
    first, last = model[0].weight, model[3].weight
    if step == 2:
        opt.set_mask(first, torch.rand(first.shape, generator=generator) > 0.5)
        opt.set_mask(last, torch.rand(last.shape, generator=generator) > 0.3)
    elif step == 5:
        opt.set_mask(first, None)
    elif step == 7:
        opt.set_mask(first, torch.rand(first.shape, generator=generator) > 0.7)


def _decay_mask_events(opt, model, step, memo):
    generator = torch.Generator().manual_seed(200 + step)
    weight = model[0].weight
    if step in (2, 7):
        opt.set_decay_mask(weight, torch.rand(weight.shape, generator=generator) > 0.5)
    elif step == 5:
        opt.set_decay_mask(weight, None)


def _add_group_events(opt, model, step, memo):
    if step == 3:
        opt.add_param_group({"params": list(model[3:].parameters()), "lr": 0.2})


def _load_state_dict_events(opt, model, step, memo):
    if step == 2:
        memo["saved"] = copy.deepcopy(opt.state_dict())
    elif step == 5:
        opt.load_state_dict(memo["saved"])


def _grad_appears(models, step):
    # The last layer gets its first gradient at step 4 (momentum buffers created mid-way).
    if step < 4:
        for model in models:
            model[4].weight.grad = model[4].bias.grad = None


def _set_to_none_events(opt, model, step, memo):
    if step in (4, 6):
        opt.zero_grad(set_to_none=True)


def _hyper_parameter_events(opt, model, step, memo):
    group = opt.param_groups[0]
    changes = {
        2: {"lr": group["lr"] * 0.5},
        3: {"weight_decay": 0.05},
        4: {"momentum": 0.5},
        5: {"momentum": 0.0},
        6: {"maximize": True},
        7: {"momentum": 0.9, "dampening": 0.1},
    }
    group.update(changes.get(step, {}))


def _state_edit_events(opt, model, step, memo):
    if step == 3:  # what a rewind does: no stale momentum
        for p in model.parameters():
            state = opt.state.get(p)
            if state is not None and "momentum_buffer" in state:
                del state["momentum_buffer"]
    elif step == 5:
        opt.state[model[0].weight]["momentum_buffer"] = torch.ones_like(model[0].weight)
    elif step == 7:
        opt.state = collections.defaultdict(dict)  # start afresh


def _param_group_edits(opt, model, step, memo):
    if step == 3:  # a parameter moves to another group
        opt.param_groups[1]["params"].append(opt.param_groups[2]["params"].pop())
    elif step == 6:  # a group's parameters in another order, in a new list
        opt.param_groups[2]["params"] = opt.param_groups[2]["params"][::-1]


def _backend_events(opt, model, step, memo):
    if step in (3, 6):
        opt.backend = {"kernel": "reference", "reference": "kernel"}[opt.backend]


def _tracking_events(opt, model, step, memo):
    if step == 3:
        opt.param_groups[0]["track_grad_avg"] = True


def _tensor_lr_events(opt, model, step, memo):
    if step == 0:
        for group in opt.param_groups:
            group["lr"] = torch.tensor(group["lr"])
    elif step in (3, 5):
        for group in opt.param_groups:
            group["lr"].mul_(0.5)  # in place, as a schedule of tensor learning rates does


def _grad_not_contiguous(models, step):
    # From step 4 on, a gradient that is not contiguous (the kernels copy it).
    if step >= 4:
        for model in models:
            grad = model[0].weight.grad
            model[0].weight.grad = grad.t().contiguous().t()
            assert not model[0].weight.grad.is_contiguous()


class Scenario(NamedTuple):
    events: Callable | None = None  # (optimizer, model, step, memo) before the gradients
    groups: Callable = _groups
    grads_in_place: bool = False  # into the existing .grad tensors, else new ones
    after_grads: Callable | None = None  # (models, step) once the gradients are set
    with_torch: bool = True  # also compared with torch.optim.SGD (reference backend)


CACHE_SCENARIOS = {
    "set_mask": Scenario(_mask_events, with_torch=False),
    "set_decay_mask": Scenario(_decay_mask_events, with_torch=False),
    "add_param_group": Scenario(_add_group_events, groups=_first_two_groups),
    "load_state_dict": Scenario(_load_state_dict_events),
    "grad_appears": Scenario(after_grads=_grad_appears),
    "grads_in_place_then_set_to_none": Scenario(_set_to_none_events, grads_in_place=True),
    "grad_not_contiguous": Scenario(after_grads=_grad_not_contiguous),
    "hyper_parameters": Scenario(_hyper_parameter_events),
    "state_edited_by_hand": Scenario(_state_edit_events),
    "param_groups_edited": Scenario(_param_group_edits),
    "backend_switch": Scenario(_backend_events, with_torch=False),
    "track_grad_avg_turned_on": Scenario(_tracking_events, with_torch=False),
    "tensor_lr_changed_in_place": Scenario(_tensor_lr_events),
}


def _set_grads_in_place(models, step, generator):
    """Like _set_grads, but into the existing .grad tensors where there are some."""
    for params in zip(*(m.parameters() for m in models), strict=True):
        grad = torch.randn(params[0].shape, generator=generator)
        for p in params:
            if p.grad is None:
                p.grad = grad.clone()
            else:
                p.grad.copy_(grad)
    if step % 3 == 1:
        for m in models:
            m[3].bias.grad = None


@pytest.mark.parametrize("backend", ["reference", "kernel"])
@pytest.mark.parametrize("scenario", list(CACHE_SCENARIOS))
def test_kept_lists_follow_every_change(backend, scenario):
    """A step with kept lists does exactly what one that gathers them afresh does (and, where
    no mask is involved, what torch.optim.SGD does), whatever changes between steps."""
    if backend == "kernel" or scenario == "backend_switch":
        pytest.importorskip("recallprune._C")
    events, groups, in_place, after_grads, with_torch = CACHE_SCENARIOS[scenario]
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)
    models = [_make_model(), _make_model()]
    opts = [
        UndecayedSGD(groups(models[0]), backend=backend, **hyper),
        _Uncached(groups(models[1]), backend=backend, **hyper),
    ]
    if with_torch and backend == "reference":
        models.append(_make_model())
        opts.append(torch.optim.SGD(groups(models[2]), foreach=False, **hyper))
    schedulers = [torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5) for opt in opts]
    memos = [{} for _ in opts]
    generator = torch.Generator().manual_seed(11)
    for step in range(10):
        for opt, model, memo in zip(opts, models, memos, strict=True):
            if events is not None:
                events(opt, model, step, memo)
        (_set_grads_in_place if in_place else _set_grads)(models, step, generator)
        if after_grads is not None:
            after_grads(models, step)
        for opt in opts:
            opt.step()
        if step < 5:  # the scheduler's lr changes, then the events' own
            for scheduler in schedulers:
                scheduler.step()
        reference_model, reference_opt = models[1], opts[1]
        for model, opt in zip(models[::2], opts[::2], strict=True):
            for p, q in zip(model.parameters(), reference_model.parameters(), strict=True):
                assert torch.equal(p, q), f"{scenario}, step {step}"
                for key in ("momentum_buffer", "keep_mask", "decay_mask", "grad_sum"):
                    value, expected = opt.state[p].get(key), reference_opt.state[q].get(key)
                    if key == "momentum_buffer" or isinstance(opt, UndecayedSGD):
                        assert (value is None) == (expected is None), f"{key}, step {step}"
                        assert value is None or torch.equal(value, expected), f"{key}, {step}"


def test_lists_are_kept_while_nothing_changes():
    pytest.importorskip("recallprune._C")
    model = _make_model()
    opt = UndecayedSGD(model.parameters(), lr=0.1, momentum=0.9, backend="kernel")
    generator = torch.Generator().manual_seed(12)
    _set_grads_in_place([model], 0, generator)
    opt.step()
    opt.step()  # the first step created the buffers: gathered again once
    kept = opt._step_lists[0]
    for step in (2, 3):  # new values in the same gradients, then new gradient tensors
        (_set_grads_in_place if step == 2 else _set_grads)([model], 0, generator)
        opt.step()
        assert opt._step_lists[0] is kept
    opt.param_groups[0]["lr"] = 0.05  # hyper-parameters are read at every step
    opt.step()
    assert opt._step_lists[0] is kept
    opt.set_mask(model[0].weight, torch.rand(model[0].weight.shape, generator=generator) > 0.5)
    opt.step()
    assert opt._step_lists[0] is not kept


def test_kept_lists_hold_no_gradient():
    # zero_grad() must free the gradients: the kept lists may not keep them alive.
    pytest.importorskip("recallprune._C")
    model = _make_model()
    opt = UndecayedSGD(model.parameters(), lr=0.1, momentum=0.9, backend="kernel")
    generator = torch.Generator().manual_seed(13)
    for step in range(3):
        _set_grads([model], step, generator)
        opt.step()
    grads = [torch.utils.weak.WeakIdRef(p.grad) for p in model.parameters()]
    opt.zero_grad(set_to_none=True)
    assert all(ref() is None for ref in grads)


def test_state_copies_are_plain_dicts():
    # Checkpoints load without recallprune: torch.load(weights_only=True), torch.optim.SGD.
    import io

    model = _make_model()
    opt = UndecayedSGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.set_mask(model[0].weight, torch.rand(model[0].weight.shape) > 0.5)
    _set_grads([model], 0, torch.Generator().manual_seed(14))
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert all(type(state) is dict for state in saved["state"].values())
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert torch.equal(loaded["state"][0]["keep_mask"], opt.get_mask(model[0].weight))
    twin = copy.deepcopy(opt)  # the optimizer itself copies, and keeps counting its changes
    twin_weight = twin.param_groups[0]["params"][0]
    twin.set_mask(twin_weight, None)
    assert twin.get_mask(twin_weight) is None and opt.get_mask(model[0].weight) is not None


def test_grad_count_skips_overflowed_steps():
    w = nn.Parameter(torch.ones(5))
    opt = UndecayedSGD([w], lr=0.1, track_grad_avg=True)
    for overflow in (0.0, 1.0, 0.0):
        w.grad = torch.full((5,), 2.0)
        opt.grad_scale, opt.found_inf = torch.tensor([1.0]), torch.tensor([overflow])
        opt.step()
    assert int(opt.state[w]["grad_count"]) == 2
    assert torch.equal(opt.grad_average(w), torch.full((5,), 2.0))


def test_tensor_overload_matches_floats(kernel_device):
    """lr and weight decay as tensors (on the device, or float64 on the CPU) give the float
    overload's results exactly."""
    hyper = dict(momentum=0.9, dampening=0.0, nesterov=False, maximize=False)
    on_device = dict(dtype=torch.float32, device=kernel_device)
    for args, _ in _op_samples(kernel_device):
        for lr, weight_decay in (
            (torch.tensor(0.1, **on_device), torch.tensor(1e-2, dtype=torch.float64)),
            (torch.tensor([0.1], dtype=torch.float64), torch.tensor([1e-2], **on_device)),
            (torch.tensor(0.1, **on_device), torch.tensor(1e-2, **on_device)),
        ):
            with_tensor = copy.deepcopy(args)
            with_float = copy.deepcopy(args)
            torch.ops.recallprune.undecayed_sgd_.tensor(
                *with_tensor, lr=lr, weight_decay=weight_decay, is_first_step=False, **hyper
            )
            torch.ops.recallprune.undecayed_sgd_(
                *with_float,
                lr=float(lr),
                weight_decay=float(weight_decay),
                is_first_step=False,
                **hyper,
            )
            tensor_results = with_tensor[0] + with_tensor[2]
            for a, b in zip(tensor_results, with_float[0] + with_float[2], strict=True):
                assert torch.equal(a, b)


def _op_samples(device):
    generator = torch.Generator().manual_seed(15)

    def rand(*shape):
        return torch.randn(shape, generator=generator).to(device)

    shapes = [(5, 3), (17,), (0,)]
    params, grads, bufs = ([rand(*s) for s in shapes] for _ in range(3))
    keeps = [rand(5, 3) > 0, None, torch.ones(0, dtype=torch.bool, device=device)]
    yield (params, grads, bufs, keeps, [], []), None


# -- memory layouts, host synchronisation, AMP arithmetic ------------------------------------


def _conv_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten())


def _channels_last_run(backend, device, steps=3):
    """A channels_last CNN with masks, weight decay, momentum and gradient averages."""
    model = _conv_model().to(device, memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()
    opt = UndecayedSGD(
        model.parameters(),
        lr=0.05,
        momentum=0.9,
        weight_decay=1e-2,
        backend=backend,
        track_grad_avg=True,
    )
    generator = torch.Generator().manual_seed(3)
    keep = torch.rand(model[0].weight.shape, generator=generator) > 0.5
    opt.set_mask(model[0].weight, keep.to(device))
    opt.set_decay_mask(
        model[2].weight, (torch.rand(4, 8, 1, 1, generator=generator) > 0.5).to(device)
    )
    x = torch.randn(5, 3, 6, 6, generator=generator).to(device, memory_format=torch.channels_last)
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return model, opt


def test_channels_last_weights_run_in_the_kernel(kernel_device):
    """Dense weights in another memory layout (channels_last) go to the kernel, which updates
    them as the reference does, and their state keeps their layout."""
    model, opt = _channels_last_run("kernel", kernel_device)
    reference, reference_opt = _channels_last_run("reference", kernel_device)
    (lists,) = opt._step_lists
    assert lists.plan.reference is None  # every tensor went to the kernel
    weight = model[0].weight
    state = opt.state[weight]
    for key in ("momentum_buffer", "keep_mask", "grad_sum"):
        assert state[key].stride() == weight.stride(), key
    assert torch.equal(weight[~state["keep_mask"]], torch.zeros_like(weight[~state["keep_mask"]]))
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.grad_average(p), reference_opt.grad_average(q))


def test_kernel_takes_a_contiguous_gradient_of_a_channels_last_weight(kernel_device):
    """A gradient in another layout than its weight's is copied into the weight's layout."""
    results = []
    for layout in (torch.channels_last, torch.contiguous_format):
        w = nn.Parameter(torch.arange(48.0).reshape(2, 3, 2, 4).to(kernel_device))
        w.data = w.data.contiguous(memory_format=torch.channels_last)
        opt = UndecayedSGD([w], lr=0.5, momentum=0.9, backend="kernel")
        for step in range(2):
            w.grad = (torch.ones_like(w) * (step + 1)).contiguous(memory_format=layout)
            opt.step()
        assert w.stride() == (24, 1, 12, 3)
        results.append(w.detach().clone())
    assert torch.equal(results[0], results[1])
    # Two steps: w - 0.5 * 1, then - 0.5 * (0.9 * 1 + 2).
    expected = torch.arange(48.0, device=kernel_device).reshape(2, 3, 2, 4) - 1.95
    torch.testing.assert_close(results[0], expected)


class _HostReads(torch.overrides.TorchFunctionMode):
    """Counts the reads of a tensor's value into Python, each a host synchronisation on a
    GPU."""

    READS = ("item", "__float__", "__bool__", "__int__", "__index__", "tolist")

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["reference", "kernel"])
def test_a_step_reads_no_tensor_value_in_python(backend):
    """A step with tensor lr and weight decay, AMP scaling and found_inf, channels_last
    weights, masks and averages reads no tensor's value into Python (after the first step,
    which gathers the lists)."""
    if backend == "kernel":
        pytest.importorskip("recallprune._C")
    model = _conv_model().to(memory_format=torch.channels_last)
    opt = UndecayedSGD(
        model.parameters(),
        lr=torch.tensor(0.05),
        momentum=0.9,
        weight_decay=torch.tensor(1e-2),
        backend=backend,
        track_grad_avg=True,
    )
    opt.set_mask(model[0].weight, torch.rand(model[0].weight.shape) > 0.5)
    x = torch.randn(5, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    reads = []
    for step in range(3):
        opt.zero_grad()
        (model(x).square().mean() * 1024).backward()
        opt.grad_scale = torch.tensor(1024.0)
        opt.found_inf = torch.tensor([float(step == 1)])  # shape [1], as well as []
        counter = _HostReads()
        with counter:
            opt.step()
        if step > 0:
            reads += counter.reads
    assert reads == []


def test_reference_step_is_free_of_host_reads_on_any_device():
    """The reference step on meta tensors, which have no values: any read of a value (a host
    synchronisation on a GPU) would raise."""
    meta = dict(device="meta")
    shapes = [(4, 3, 2, 2), (7,)]
    params = [
        torch.empty(s, **meta).contiguous(memory_format=torch.channels_last)
        if len(s) == 4
        else torch.empty(s, **meta)
        for s in shapes
    ]
    grads = [torch.empty_like(p, dtype=torch.float32) for p in params]
    buffers = [None, torch.empty(7, **meta)]
    undecayed_sgd_reference(
        params,
        grads,
        buffers,
        [torch.empty(shapes[0], dtype=torch.bool, **meta), None],
        [None, torch.empty(7, dtype=torch.bool, **meta)],
        [torch.empty(s, **meta) for s in shapes],
        lr=torch.empty((), **meta),
        momentum=0.9,
        dampening=0.0,
        weight_decay=torch.empty([1], **meta),
        nesterov=True,
        maximize=False,
        grad_scale=torch.empty((), **meta),
        found_inf=torch.empty([1], **meta),
    )
    assert buffers[0] is not None and buffers[0].shape == shapes[0]


@pytest.mark.parametrize("shape", [[], [1]])
@pytest.mark.parametrize("backend", ["reference", "kernel"])
def test_found_inf_and_grad_scale_of_either_shape(backend, shape):
    """GradScaler hands over 0-dim tensors; [1] ones work the same, a 0-dim weight too."""
    if backend == "kernel":
        pytest.importorskip("recallprune._C")
    results = []
    for overflow in (0.0, 1.0):
        scalar, vector = nn.Parameter(torch.tensor(1.5)), nn.Parameter(torch.ones(3))
        opt = UndecayedSGD(
            [scalar, vector], lr=0.5, momentum=0.9, backend=backend, track_grad_avg=True
        )
        scalar.grad, vector.grad = torch.tensor(4.0), torch.full((3,), 4.0)
        opt.grad_scale = torch.full(shape, 2.0)
        opt.found_inf = torch.full(shape, overflow)
        opt.step()
        results.append((scalar.item(), vector.tolist(), opt.grad_average(scalar).item()))
    assert results[0] == (0.5, [0.0] * 3, 2.0)  # 1.5 - 0.5 * 4 / 2, and the mean gradient 2
    assert results[1] == (1.5, [1.0] * 3, 0.0)  # skipped: nothing moved, no step counted


def test_reference_overflow_changes_nothing_after_the_first_step():
    generator = torch.Generator().manual_seed(4)
    params = [torch.randn(6, 5, generator=generator), torch.randn(9, generator=generator)]
    buffers = [torch.randn(6, 5, generator=generator), torch.randn(9, generator=generator)]
    sums = [torch.randn(6, 5, generator=generator), torch.randn(9, generator=generator)]
    before = [t.clone() for t in params + buffers + sums]
    grads = [torch.full_like(p, float("inf")) for p in params]
    undecayed_sgd_reference(
        params,
        grads,
        buffers,
        [params[0] > 0, None],
        [None, None],
        sums,
        lr=0.1,
        momentum=0.9,
        dampening=0.0,
        weight_decay=1e-2,
        nesterov=False,
        maximize=False,
        grad_scale=torch.tensor(8.0),
        found_inf=torch.tensor(1.0),
    )
    for a, b in zip(params + buffers + sums, before, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_amp_unscales_in_float32_in_reference_and_kernel(dtype, kernel_device):
    """A scaled gradient whose unscaled value lies below the weights' dtype's smallest number
    is unscaled in float32 by both implementations: the gradient average sees it, and the
    weights and momentum agree to a few ulp."""
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(64, generator=generator).to(kernel_device, dtype)
    scaled = torch.full((64,), 6.55e-4).to(kernel_device, dtype)
    scaled[::2] = torch.randn(32, generator=generator).to(kernel_device, dtype) * 1000
    results = {}
    for backend in ("reference", "kernel"):
        w = nn.Parameter(weight.clone())
        opt = UndecayedSGD(
            [w], lr=0.1, momentum=0.9, weight_decay=1e-2, backend=backend, track_grad_avg=True
        )
        for _ in range(2):
            w.grad = scaled.clone()
            opt.grad_scale = torch.tensor(65536.0, device=kernel_device)
            opt.found_inf = torch.tensor(0.0, device=kernel_device)
            opt.step()
        results[backend] = (w.detach(), opt.state[w]["momentum_buffer"], opt.grad_average(w))
    expected_small = torch.tensor(6.55e-4, dtype=dtype).float() / 65536
    for backend, (_, _, average) in results.items():
        assert average.dtype == torch.float32
        assert torch.equal(average[1::2].cpu(), torch.full((32,), expected_small.item())), backend
    (w_ref, buf_ref, avg_ref), (w_ker, buf_ker, avg_ker) = results["reference"], results["kernel"]
    torch.testing.assert_close(avg_ker, avg_ref, rtol=0, atol=0)
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(w_ker, w_ref, rtol=2 * ulp, atol=0)
    torch.testing.assert_close(buf_ker, buf_ref, rtol=2 * ulp, atol=torch.finfo(dtype).tiny)


SYNC_FREE_CASES = {
    "tensor_lr": dict(lr=True),
    "tensor_weight_decay": dict(weight_decay=True),
    "channels_last": dict(channels_last=True),
    "amp": dict(amp=True),
    "everything": dict(lr=True, weight_decay=True, channels_last=True, amp=True),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["kernel", "reference"])
@pytest.mark.parametrize("case", list(SYNC_FREE_CASES))
def test_cuda_step_does_not_sync(case, backend):
    """No step after the first (which gathers the lists) synchronises with the host, and the
    results are those of float hyper-parameters."""
    if backend == "kernel":
        pytest.importorskip("recallprune._C")
    options = SYNC_FREE_CASES[case]
    layout = torch.channels_last if options.get("channels_last") else torch.contiguous_format
    models = [_conv_model().cuda().to(memory_format=layout) for _ in range(2)]
    optimizers = []
    for tensors, model in zip((True, False), models, strict=True):
        hyper = {}
        for name, value in (("lr", 0.05), ("weight_decay", 1e-2)):
            as_tensor = tensors and options.get(name)
            hyper[name] = torch.tensor(value, device="cuda") if as_tensor else value
        opt = UndecayedSGD(
            model.parameters(), momentum=0.9, backend=backend, track_grad_avg=True, **hyper
        )
        opt.set_mask(model[0].weight, model[0].weight.detach() > 0)
        optimizers.append(opt)
    generator = torch.Generator().manual_seed(6)
    for step in range(4):
        for params in zip(*(m.parameters() for m in models), strict=True):
            grad = torch.randn(params[0].shape, generator=generator).cuda()
            for p in params:
                p.grad = grad.contiguous(memory_format=layout) if p.dim() == 4 else grad.clone()
        for opt in optimizers:
            if options.get("amp"):
                opt.grad_scale = torch.tensor(1.0, device="cuda")
                opt.found_inf = torch.tensor(float(step == 2), device="cuda")
        if step >= 1:
            torch.cuda.set_sync_debug_mode("error")
        try:
            optimizers[0].step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        optimizers[1].step()
    for p, q in zip(*(m.parameters() for m in models), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_cpu_kernel_results_do_not_depend_on_the_number_of_threads(dtype):
    """The CPU kernel splits the work into chunks and runs each thread's consecutive chunks
    of a tensor as one range: every element takes the same path (vector or scalar tail)
    with one thread as with two, so the results are bit-identical."""
    pytest.importorskip("recallprune._C")
    sizes = [3 * 32768 + 5, 7, 65536, 40001, 1]
    generator = torch.Generator().manual_seed(12)
    start = [torch.randn(n, generator=generator).to(dtype) for n in sizes]
    grads = [torch.randn(n, generator=generator).to(dtype) for n in sizes]
    keeps = [torch.rand(n, generator=generator) < 0.6 for n in sizes]
    hyper = dict(
        lr=0.05, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=False
    )
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            params = [p.clone() for p in start]
            bufs = [
                torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype) for n in sizes
            ]
            torch.ops.recallprune.undecayed_sgd_(
                params, grads, bufs, keeps, [], [], is_first_step=False, **hyper
            )
            results.append(params + bufs)
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)


# -- packed keep masks (the CPU kernel) -------------------------------------------------------


def test_pack_keep_mask_holds_a_bit_per_element_in_memory_order():
    from recallprune.ops.undecayed_sgd import pack_keep_mask

    mask = torch.tensor([1, 0, 0, 1, 1, 1, 0, 0, 1, 1], dtype=torch.bool)
    packed = pack_keep_mask(torch.empty(10), mask)
    assert packed.dtype == torch.uint8 and packed.tolist() == [0b00111001, 0b00000011]
    # A channels_last weight: the bits follow the memory order (channels fastest).
    weight = torch.empty(1, 2, 1, 3).contiguous(memory_format=torch.channels_last)
    keep = torch.tensor([[[[1, 0, 1]], [[0, 0, 1]]]], dtype=torch.bool)
    keep = keep.contiguous(memory_format=torch.channels_last)
    # Memory order: (c0,w0) (c1,w0) (c0,w1) (c1,w1) (c0,w2) (c1,w2) = 1 0 0 0 1 1.
    assert pack_keep_mask(weight, keep).tolist() == [0b110001]
    assert pack_keep_mask(torch.empty(0), torch.ones(0, dtype=torch.bool)).numel() == 0


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str
)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_kernel_with_packed_keep_masks_equals_byte_masks(dtype, momentum):
    """The CPU kernel reads packed keep masks (bits) and byte masks alike: bit-identical
    weights, momentum and gradient sums, for sizes about a byte of bits, a vector and a
    chunk, with decay masks and without."""
    pytest.importorskip("recallprune._C")
    from recallprune.ops.undecayed_sgd import pack_keep_mask

    sizes = [1, 7, 8, 9, 63, 64, 65, 2 * 32768 + 13, 1000]
    generator = torch.Generator().manual_seed(21)
    start = [torch.randn(n, generator=generator).to(dtype) for n in sizes]
    keeps = [torch.rand(n, generator=generator) < 0.6 for n in sizes]
    keeps[1] = None  # a parameter without a mask among masked ones
    decays = [
        torch.rand(n, generator=generator) < 0.5 if i % 2 else None for i, n in enumerate(sizes)
    ]
    sum_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    hyper = dict(
        lr=0.05, momentum=momentum, dampening=0.0, weight_decay=1e-2, nesterov=False, maximize=False
    )
    results = []
    for packed in (False, True):
        params = [p.clone() for p in start]
        for p, k in zip(params, keeps, strict=True):
            if k is not None:
                p.masked_fill_(~k, 0)
        bufs = [torch.zeros_like(p) for p in params] if momentum else []
        sums = [torch.zeros(n, dtype=sum_dtype) for n in sizes]
        masks = [
            None if k is None else (pack_keep_mask(p, k) if packed else k)
            for p, k in zip(params, keeps, strict=True)
        ]
        step_generator = torch.Generator().manual_seed(5)
        for step in range(2):
            grads = [torch.randn(n, generator=step_generator).to(dtype) for n in sizes]
            torch.ops.recallprune.undecayed_sgd_(
                params,
                grads,
                bufs,
                masks,
                decays,
                sums,
                is_first_step=step == 0,
                keep_masks_packed=packed,
                **hyper,
            )
        results.append(params + bufs + sums)
    for with_bytes, with_bits in zip(*results, strict=True):
        assert torch.equal(with_bytes, with_bits)


def test_the_cpu_step_packs_its_keep_masks():
    model = _conv_model().to(memory_format=torch.channels_last)
    opt = UndecayedSGD(model.parameters(), lr=0.1, momentum=0.9, backend="kernel")
    keep = torch.rand(model[0].weight.shape) > 0.5
    opt.set_mask(model[0].weight, keep)
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    opt.step()
    (lists,) = opt._step_lists
    (launch,) = lists.plan.launches
    assert launch.keep_masks_packed
    packed = launch.keep_masks[0]
    assert packed.dtype == torch.uint8 and packed.numel() == (keep.numel() + 7) // 8
    assert torch.equal(model[0].weight[~keep], torch.zeros_like(model[0].weight[~keep]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_cuda_kernel_refuses_packed_keep_masks():
    pytest.importorskip("recallprune._C")
    w = torch.zeros(20, device="cuda")
    with pytest.raises(RuntimeError, match="keep_masks_packed is taken by the CPU kernel only"):
        torch.ops.recallprune.undecayed_sgd_(
            [w],
            [torch.zeros_like(w)],
            [],
            [torch.zeros(3, dtype=torch.uint8, device="cuda")],
            [],
            [],
            lr=0.1,
            momentum=0.0,
            dampening=0.0,
            weight_decay=0.0,
            nesterov=False,
            maximize=False,
            is_first_step=False,
            keep_masks_packed=True,
        )
