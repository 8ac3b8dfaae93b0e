"""recallprune.ops.stacked_mlp_grads: one training step's losses and gradients of stacked MLPs
in one call of the CPU kernels, against the same step through autograd (bit for bit where
torch uses AVX2 or AVX-512), its checks, and the study's stacked step that runs it."""

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from recallprune.ops import stacked_linear as stacked_linear_module
from recallprune.ops.stacked_linear import KeptWeights, stacked_linear, stacked_mlp_grads
from recallprune.optim import UndecayedSGD, decay_param_groups
from recallprune.study import grid
from recallprune.study.models import MLP
from recallprune.study.stacked import StackedMLP

from .conftest import requires_ops

ops = torch.ops.recallprune


def _vector_cpu():
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _net(models, sizes, density=None, seed=0, scale=3.0):
    """Weights, biases and kept lists of ``models`` stacked MLPs with layer sizes ``sizes``;
    with ``density``, the layers compact (model 0 whole, model 1 with an empty and a whole
    row), the weights their kept values. ``scale`` spreads the logits (over tens, as a trained
    model's: the exponentials then differ in their last bits between implementations)."""
    g = torch.Generator().manual_seed(seed)
    weights, biases, kept = [], [], []
    for inputs, out in zip(sizes[:-1], sizes[1:], strict=True):
        weight = torch.randn(models, out, inputs, generator=g) * scale / inputs**0.5
        biases.append(torch.randn(models, out, generator=g) * 0.1)
        if density is None:
            weights.append(weight)
            kept.append(None)
            continue
        mask = torch.rand(models, out, inputs, generator=g) < density
        mask[0] = True
        if models > 1 and out > 2:
            mask[1, 1] = False
            mask[1, 2] = True
        k = KeptWeights.from_mask(mask)
        weights.append(k.compact(weight))
        kept.append(k)
    return weights, biases, kept


def _data(samples, features, classes, models, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=g)
    y = torch.randint(0, classes, (samples,), generator=g)
    batch = torch.stack([torch.randperm(samples, generator=g)[:n] for _ in range(models)])
    return x, y, batch


def _autograd(x, y, batch, weights, biases, kept, backend):
    """The step through autograd: stacked_linear (``backend``), cross_entropy, backward."""
    leaves = [t.clone().requires_grad_() for t in [*weights, *biases]]
    out = x[batch].transpose(1, 2)
    for i, k in enumerate(kept):
        relu = i < len(kept) - 1
        out = stacked_linear(out, leaves[i], leaves[len(kept) + i], k, relu, backend=backend)
    losses = torch.nn.functional.cross_entropy(out, y[batch], reduction="none")
    losses.mean(dim=1).sum().backward()
    grads = [t.grad for t in leaves]
    return losses.detach(), grads[: len(kept)], grads[len(kept) :]


def _same(got, want, exact, name=""):
    assert got.shape == want.shape, name
    if exact:
        assert torch.equal(got, want), (name, (got - want).abs().max().item())
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def _assert_same(got, want, exact):
    """(losses, weight gradients, bias gradients) against another such triple."""
    losses, grad_weights, grad_biases = got
    _same(losses, want[0], exact, "losses")
    for name, g_list, w_list in (
        ("weights", grad_weights, want[1]),
        ("biases", grad_biases, want[2]),
    ):
        assert len(g_list) == len(w_list), name
        for g, w in zip(g_list, w_list, strict=True):
            _same(g, w, exact, name)


# (models, layer sizes, samples per model): the study's MLP; whole vectors of samples and
# tails of every length (the log-softmax's scalar tail, the mean's inexact 1 / n); one layer;
# one sample; one class.
CASES = [
    (3, [64, 300, 100, 10], 64),
    (3, [64, 300, 100, 10], 37),
    (2, [20, 30, 7], 3),
    (2, [20, 30, 7], 48),
    (4, [9, 5], 21),
    (2, [12, 8, 4], 1),
    (2, [6, 4, 1], 5),
]


@requires_ops
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("density", [None, 0.3, 0.8])
def test_stacked_mlp_grads_kernel_is_the_autograd_step(case, density):
    """The same losses and gradients as autograd through the stacked_linear kernels and
    torch's cross_entropy: the same bits where torch uses AVX2 or AVX-512 (the same products
    in the same order, the same log-softmax), and to rounding against torch's products."""
    models, sizes, n = case
    weights, biases, kept = _net(models, sizes, density)
    x, y, batch = _data(80, sizes[0], sizes[-1], models, n)
    got = stacked_mlp_grads(x, y, batch, weights, biases, kept, backend="kernel")
    through_kernels = _autograd(x, y, batch, weights, biases, kept, "kernel")
    _assert_same(got, through_kernels, exact=_vector_cpu())
    _assert_same(got, _autograd(x, y, batch, weights, biases, kept, "reference"), exact=False)
    # The other backends give the autograd step's own numbers.
    reference = stacked_mlp_grads(x, y, batch, weights, biases, kept, backend="reference")
    _assert_same(reference, _autograd(x, y, batch, weights, biases, kept, "reference"), True)


@requires_ops
def test_stacked_mlp_grads_kernel_dense_above_changes_only_the_speed():
    """Which blocks go dense changes neither the losses nor the input gradients' chain: the
    losses and bias gradients are the same bits, the weight gradients agree to rounding."""
    weights, biases, kept = _net(3, [40, 50, 20, 5], density=0.5)
    x, y, batch = _data(70, 40, 5, 3, 33)
    runs = [
        stacked_mlp_grads(x, y, batch, weights, biases, kept, dense_above=d, backend="kernel")
        for d in (0.0, 0.5, 2.0)
    ]
    for other in runs[1:]:
        assert torch.equal(other[0], runs[0][0])
        for g, w in zip(other[2], runs[0][2], strict=True):
            assert torch.equal(g, w)
        for g, w in zip(other[1], runs[0][1], strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@requires_ops
def test_stacked_mlp_grads_kernel_reads_a_strided_batch():
    weights, biases, kept = _net(3, [10, 8, 4], density=0.4)
    x, y, _ = _data(50, 10, 4, 3, 10)
    orders = torch.stack([torch.randperm(50) for _ in range(3)])
    strided = orders[:, 5:17]
    assert not strided.is_contiguous()
    got = stacked_mlp_grads(x, y, strided, weights, biases, kept, backend="kernel")
    want = stacked_mlp_grads(x, y, strided.contiguous(), weights, biases, kept, backend="kernel")
    _assert_same(got, want, exact=True)


@requires_ops
def test_opcheck_stacked_mlp_grads_kernel():
    weights, biases, kept = _net(2, [6, 5, 3], density=0.5)
    x, y, batch = _data(12, 6, 3, 2, 4)
    lists = []
    for k in kept:
        lists += [k.row_ptr, k.row_cols, k.col_ptr, k.col_rows, k.col_vals]
    dense, dense_biases, _ = _net(2, [6, 5, 3])
    calls = [
        (x, y, batch, weights, biases, lists, 0.5),
        (x, y, batch, dense, dense_biases, [], 0.5),
        (x, y, batch, dense, dense_biases, [None] * 10, 2.0),
    ]
    for args in calls:
        torch.library.opcheck(ops.stacked_mlp_grads.default, args)


@requires_ops
def test_stacked_mlp_grads_kernel_errors():
    weights, biases, kept = _net(2, [6, 5, 4, 3], density=0.5)
    x, y, batch = _data(12, 6, 3, 2, 4)
    lists = []
    for k in kept:
        lists += [k.row_ptr, k.row_cols, k.col_ptr, k.col_rows, k.col_vals]

    def call(**changes):
        args = dict(x=x, y=y, batch=batch, weights=weights, biases=biases, lists=lists)
        args.update(changes)
        return ops.stacked_mlp_grads(*args.values(), 0.5)

    with pytest.raises(RuntimeError, match=r"x must be a contiguous float32 \[N, features\]"):
        call(x=x.double())
    with pytest.raises(RuntimeError, match="y must be a contiguous int64 CPU tensor of x's 12"):
        call(y=y[:5])
    with pytest.raises(RuntimeError, match=r"batch must be an int64 \[B, n\]"):
        call(batch=batch.int())
    with pytest.raises(RuntimeError, match="same layers"):
        call(biases=biases[:1])
    with pytest.raises(RuntimeError, match="5 entries per layer"):
        call(lists=lists[:7])
    with pytest.raises(RuntimeError, match="layer 1: a compact weight must be"):
        swapped = list(lists)
        swapped[5:7] = lists[10:12]  # layer 2's rows
        call(lists=swapped)
    with pytest.raises(RuntimeError, match="layer 1: the input gradient of a compact weight"):
        call(lists=lists[:7] + [None] * 3 + lists[10:])
    dense, dense_biases, _ = _net(2, [6, 5, 4, 3])
    with pytest.raises(RuntimeError, match=r"layer 1: weight must be .* in = 5"):
        call(weights=[dense[0], dense[1][:, :, :4].contiguous(), dense[2]], biases=dense_biases,
             lists=[])  # fmt: skip
    with pytest.raises(RuntimeError, match="layer 0: bias must be"):
        call(weights=dense, biases=[dense_biases[0][:, :2].contiguous(), *dense_biases[1:]],
             lists=[])  # fmt: skip
    for value in (12, -1):
        bad = batch.clone()
        bad[1, 2] = value
        with pytest.raises(RuntimeError, match=r"every entry of batch must index a sample of x"):
            call(batch=bad)
    for value in (3, -2):
        bad = y.clone()
        bad[batch[1, 0]] = value
        with pytest.raises(RuntimeError, match=r"must be a class in \[0, 3\)"):
            call(y=bad)
    cols = kept[1].row_cols.clone()
    cols[-1] = 5
    with pytest.raises(RuntimeError, match="ascending columns"):
        call(lists=lists[:6] + [cols] + lists[7:])
    rows = kept[1].col_rows.clone()
    rows[-1] = 4
    with pytest.raises(RuntimeError, match="ascending rows"):
        call(lists=lists[:8] + [rows] + lists[9:])
    with pytest.raises(ValueError, match="same layers"):
        stacked_mlp_grads(x, y, batch, weights, biases[:2], kept)
    with pytest.raises(RuntimeError, match="float32 CPU tensors only"):
        stacked_mlp_grads(x.double(), y, batch, weights, biases, kept, backend="kernel")


def _study_stack(models=5, seed=0):
    torch.manual_seed(seed)
    stacked = StackedMLP([MLP(64, 10) for _ in range(models)])
    masks = {}
    g = torch.Generator().manual_seed(seed)
    for name, p in stacked.named_parameters():
        if p.dim() == 3:
            mask = torch.rand(p.shape, generator=g) < 0.3
            mask[::3] = True
            masks[name] = mask
            with torch.no_grad():
                p.mul_(mask)
    stacked.compact(masks)
    return stacked


@requires_ops
def test_stacked_step_fused_kernel_is_the_autograd_step(monkeypatch):
    """The study's stacked step through the fused kernel trains the models as the step
    through autograd does: the same losses and parameters after several steps (the same bits
    where torch uses AVX2 or AVX-512), last short batch included."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(150, 1, 8, 8, generator=g), torch.randint(0, 10, (150,), generator=g)
    results = []
    for fused in (True, False):
        # The kernels on every instruction set (auto leaves the portable one to torch).
        monkeypatch.setattr(stacked_linear_module, "_vector_cpu", lambda: True)
        stacked = _study_stack()
        assert stacked.fused_step(x)
        if not fused:
            monkeypatch.setattr(StackedMLP, "fused_step", lambda self, x: False)
        optimizer = UndecayedSGD(decay_param_groups(stacked, 5e-4), lr=0.05, momentum=0.9)
        gens = [torch.Generator().manual_seed(i) for i in range(stacked.num_models)]
        orders = grid.stacked_batches(len(x), 64, gens)
        losses = [
            grid.stacked_step(stacked, optimizer, x, y, orders[:, s : s + 64])
            for s in range(0, len(x), 64)
        ]
        results.append((losses, {n: p.detach().clone() for n, p in stacked.named_parameters()}))
        monkeypatch.undo()
    (fused_losses, fused_params), (plain_losses, plain_params) = results
    for a, b in zip(fused_losses, plain_losses, strict=True):
        _same(a, b, _vector_cpu(), "losses")
    for name in fused_params:
        _same(fused_params[name], plain_params[name], _vector_cpu(), name)


@requires_ops
def test_stacked_mlp_step_grads_kernel_replaces_the_gradients(monkeypatch):
    monkeypatch.setattr(stacked_linear_module, "_vector_cpu", lambda: True)
    stacked = _study_stack(models=3)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(40, 64, generator=g), torch.randint(0, 10, (40,), generator=g)
    batch = torch.stack([torch.randperm(40, generator=g)[:16] for _ in range(3)])
    for p in stacked.parameters():
        p.grad = torch.full_like(p, 7.0)
    losses = stacked.step_grads(x, y, batch)
    stale = {n: p.grad for n, p in stacked.named_parameters()}
    for p in stacked.parameters():
        p.grad = None
    logits = stacked(x[batch])
    want = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y[batch], reduction="none")
    want.mean(dim=1).sum().backward()
    _same(losses, want.detach(), _vector_cpu(), "losses")
    for name, p in stacked.named_parameters():
        _same(stale[name], p.grad, _vector_cpu(), name)


@requires_ops
def test_stacked_mlp_grads_kernel_same_bits_on_any_number_of_threads():
    """The models are shared out among the threads as they go: each model's results are the
    same whichever thread computes it, and however many there are."""
    weights, biases, kept = _net(9, [20, 30, 12, 4], density=0.3)
    x, y, batch = _data(60, 20, 4, 9, 24)
    threads = torch.get_num_threads()
    try:
        runs = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            runs.append(stacked_mlp_grads(x, y, batch, weights, biases, kept, backend="kernel"))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        _assert_same(other, runs[0], exact=True)


def _stepping_net(models=3, sizes=(9, 7, 5, 3), seed=0):
    """Stacked parameters as the study holds them: the first layer compact, the second dense
    with a keep mask (zero where pruned), the last dense; an UndecayedSGD with the weights
    decayed and the biases not; and the keep masks by parameter."""
    weights, biases, _ = _net(models, list(sizes), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    mask = torch.rand(weights[0].shape, generator=g) < 0.5
    kept = [KeptWeights.from_mask(mask), None, None]
    weights[0] = kept[0].compact(weights[0])
    keep = torch.rand(weights[1].shape, generator=g) < 0.6
    weights[1] = weights[1] * keep
    params = [torch.nn.Parameter(t.clone()) for t in [*weights, *biases]]
    return params, kept, keep


def _optimizer(params, keep, **options):
    layers = len(params) // 2
    groups = [
        {"params": params[:layers], "weight_decay": 5e-3},
        {"params": params[layers:], "weight_decay": 0.0},
    ]
    optimizer = UndecayedSGD(groups, lr=0.05, momentum=0.9, **options)
    optimizer.set_mask(params[1], keep)
    return optimizer


@requires_ops
@pytest.mark.parametrize(
    "options", [{}, {"nesterov": True}, {"dampening": 0.3}, {"maximize": True}], ids=str
)
def test_stacked_mlp_step_kernel_is_the_optimizers_step(options):
    """The fused step leaves the parameters and momentum buffers that stacked_mlp_grads then
    optimizer.step() leave, bit for bit (each model's slice through the same per-element
    paths as the optimizer's pass over the whole parameter: its vector body, its scalar tail),
    step after step; the first step, which makes the buffers, is the optimizer's own."""
    from recallprune.ops.stacked_linear import stacked_mlp_step_

    x, y, _ = _data(70, 9, 3, 3, 13)
    runs = []
    for fused in (True, False):
        params, kept, keep = _stepping_net()
        optimizer = _optimizer(params, keep, **options)
        layers = len(params) // 2
        g = torch.Generator().manual_seed(9)
        losses = []
        for step in range(5):
            batch = torch.stack([torch.randperm(70, generator=g)[:13] for _ in range(3)])
            args = optimizer.fused_step_args(params)
            assert (args is None) == (step == 0)  # no momentum buffers before the first step
            if fused and args is not None:
                out = (
                    stacked_mlp_step_(x, y, batch, params[:layers], params[layers:], kept, args),
                )
            else:
                out = stacked_mlp_grads(
                    x, y, batch, params[:layers], params[layers:], kept, backend="kernel"
                )
                for p, grad in zip(params, [*out[1], *out[2]], strict=True):
                    p.grad = grad
                optimizer.step()
            losses.append(out[0])
        buffers = [optimizer.state[p]["momentum_buffer"].clone() for p in params]
        runs.append((losses, [p.detach().clone() for p in params], buffers))
    for got, want in zip(runs[0], runs[1], strict=True):
        for a, b in zip(got, want, strict=True):
            _same(a, b, exact=True)
    pruned = ~_stepping_net()[2]
    assert (runs[0][1][1][pruned] == 0).all() and (runs[0][2][1][pruned] == 0).all()


@requires_ops
def test_stacked_mlp_step_kernel_bad_input_changes_nothing():
    from recallprune.ops.stacked_linear import stacked_mlp_step_

    x, y, batch = _data(30, 9, 3, 3, 6)
    params, kept, keep = _stepping_net()
    optimizer = _optimizer(params, keep)
    layers = len(params) // 2
    out = stacked_mlp_grads(x, y, batch, params[:layers], params[layers:], kept)
    for p, grad in zip(params, [*out[1], *out[2]], strict=True):
        p.grad = grad
    optimizer.step()
    args = optimizer.fused_step_args(params)
    before = [p.detach().clone() for p in params] + [b.clone() for b in args["momentum_buffers"]]

    def unchanged():
        after = [p.detach() for p in params] + args["momentum_buffers"]
        return all(torch.equal(a, b) for a, b in zip(before, after, strict=True))

    bad_y = y.clone()
    bad_y[batch[2, 5]] = 3
    with pytest.raises(RuntimeError, match="must be a class in"):
        stacked_mlp_step_(x, bad_y, batch, params[:layers], params[layers:], kept, args)
    assert unchanged()
    bad_batch = batch.clone()
    bad_batch[1, 0] = 30
    with pytest.raises(RuntimeError, match="must index a sample"):
        stacked_mlp_step_(x, y, bad_batch, params[:layers], params[layers:], kept, args)
    assert unchanged()
    # Lists built by hand are checked before anything changes.
    k = kept[0]
    cols = k.row_cols.clone()
    last = int(torch.nonzero(k.row_ptr.diff() >= 2)[-1])
    first = int(k.row_ptr[last])
    cols[first], cols[first + 1] = cols[first + 1].item(), cols[first].item()
    by_hand = KeptWeights(k.mask, k.row_ptr, cols, k.col_ptr, k.col_rows, k.col_vals)
    with pytest.raises(RuntimeError, match="well formed"):
        stacked_mlp_step_(x, y, batch, params[:layers], params[layers:], [by_hand, *kept[1:]], args)
    assert unchanged()
    with pytest.raises(RuntimeError, match="takes no keep mask"):
        masks = [torch.ones_like(params[0], dtype=torch.bool), *args["keep_masks"][1:]]
        stacked_mlp_step_(
            x, y, batch, params[:layers], params[layers:], kept, {**args, "keep_masks": masks}
        )
    assert unchanged()


def test_fused_step_args_only_where_the_step_is_the_same():
    params, _, keep = _stepping_net()
    layers = len(params) // 2
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer = _optimizer(params, keep)
    assert optimizer.fused_step_args(params) is None  # no buffers yet
    optimizer.step()
    args = optimizer.fused_step_args(params)
    assert args["lr"] == [0.05] * 6 and args["weight_decay"] == [5e-3] * 3 + [0.0] * 3
    assert args["momentum"] == 0.9 and args["keep_masks"][1] is optimizer.get_mask(params[1])
    assert args["momentum_buffers"][0] is optimizer.state[params[0]]["momentum_buffer"]
    assert optimizer.fused_step_args(params + [torch.nn.Parameter(torch.zeros(2))]) is None
    optimizer.set_decay_mask(params[0], torch.ones_like(params[0], dtype=torch.bool))
    assert optimizer.fused_step_args(params) is None
    optimizer.set_decay_mask(params[0], None)
    optimizer.param_groups[1]["nesterov"] = True  # options the groups do not share
    assert optimizer.fused_step_args(params) is None
    optimizer.param_groups[1]["nesterov"] = False
    handle = optimizer.register_step_post_hook(lambda *a: None)
    assert optimizer.fused_step_args(params) is None
    handle.remove()
    handle = register_optimizer_step_pre_hook(lambda *a: None)
    try:
        assert optimizer.fused_step_args(params) is None
    finally:
        handle.remove()
    assert optimizer.fused_step_args(params) is not None
    tracking = _optimizer(params, keep, track_grad_avg=True)
    tracking.step()
    assert tracking.fused_step_args(params) is None
    assert UndecayedSGD(params[:layers], lr=0.1).fused_step_args(params[:layers]) is None


@requires_ops
def test_opcheck_stacked_mlp_step_kernel():
    x, y, batch = _data(30, 9, 3, 3, 6)
    params, kept, keep = _stepping_net()
    weights = [p.detach().clone() for p in params[:3]]
    biases = [p.detach().clone() for p in params[3:]]
    lists = [kept[0].row_ptr, kept[0].row_cols, None, None, None] + [None] * 10
    momenta = [torch.randn_like(t) for t in weights + biases]
    args = (x, y, batch, weights, biases, lists, momenta[:3], momenta[3:], [None, keep, None])
    options = ([0.1] * 6, [1e-3] * 3 + [0.0] * 3, 0.9, 0.0, False, False, True, 0.5)
    torch.library.opcheck(ops.stacked_mlp_step_.default, args + options)


@requires_ops
def test_stacked_mlp_step_fused_kernel_spends_the_gradients(monkeypatch):
    monkeypatch.setattr(stacked_linear_module, "_vector_cpu", lambda: True)
    stacked = _study_stack(models=3)
    optimizer = UndecayedSGD(decay_param_groups(stacked, 5e-4), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(40, 64, generator=g), torch.randint(0, 10, (40,), generator=g)
    batch = torch.stack([torch.randperm(40, generator=g)[:16] for _ in range(3)])
    assert stacked.step_fused(x, y, batch, optimizer) is None  # no momentum yet: nothing done
    assert all(p.grad is None for p in stacked.parameters())
    stacked.step_grads(x, y, batch)
    optimizer.step()
    before = [p.detach().clone() for p in stacked.parameters()]
    bad = y.clone()
    bad[batch[0, 0]] = 10
    with pytest.raises(RuntimeError, match="class in"):
        stacked.step_fused(x, bad, batch, optimizer)
    assert all(p.grad is not None for p in stacked.parameters())  # left as they were
    assert all(torch.equal(a, p) for a, p in zip(before, stacked.parameters(), strict=True))
    losses = stacked.step_fused(x, y, batch, optimizer)
    assert losses.shape == (3, 16) and all(p.grad is None for p in stacked.parameters())
    assert not any(torch.equal(a, p) for a, p in zip(before, stacked.parameters(), strict=True))
