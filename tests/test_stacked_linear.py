"""recallprune.ops.stacked_linear: the CPU kernels against torch's batched products, dense and
compact weights, the dense and sparse paths against each other, the op checks, and the stacked
layers' compact form."""

import pytest
import torch

from recallprune.ops.stacked_linear import KeptWeights, stacked_linear
from recallprune.study.models import MLP
from recallprune.study.stacked import StackedMLP

from .conftest import requires_ops

# (models, in, out, samples): chunk and block tails, one sample, the study's layers.
SHAPES = [(3, 7, 13, 5), (2, 64, 300, 64), (2, 300, 100, 67), (4, 10, 9, 130), (1, 33, 20, 1)]
ops = torch.ops.recallprune


def _case(models, inputs, out, samples, density=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(models, inputs, samples, generator=g)
    weight = torch.randn(models, out, inputs, generator=g)
    bias = torch.randn(models, out, generator=g)
    mask = torch.rand(models, out, inputs, generator=g) < density
    mask[0] = True  # a whole model beside pruned ones
    if models > 1 and out > 2:
        mask[1, 1] = False  # an empty row
        mask[1, 2] = True  # a whole row
    grad = torch.randn(models, out, samples, generator=g)
    return x, weight, bias, KeptWeights.from_mask(mask), grad


def _run(x, weight, bias, kept, relu, grad, **kwargs):
    """The output and the gradients of input, weight and bias (the CPU kernels unless
    ``backend`` says otherwise)."""
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    kwargs.setdefault("backend", "kernel")
    out = stacked_linear(*leaves[:2], leaves[2], kept, relu, **kwargs)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves]


@requires_ops
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("compact", [False, True])
def test_stacked_linear_kernel_matches_reference(shape, relu, compact):
    x, weight, bias, kept, grad = _case(*shape)
    if compact:
        weight = kept.compact(weight)
    else:
        kept = None
    got = _run(x, weight, bias, kept, relu, grad, backend="kernel")
    want = _run(x, weight, bias, kept, relu, grad, backend="reference")
    scale = shape[1] ** 0.5
    for name, g, w in zip(("output", "input", "weight", "bias"), got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * scale, msg=name)
    if relu:  # the relu's zeros are exact, and nothing passes back through them
        assert torch.equal(got[0] == 0, want[0] == 0)


@requires_ops
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("relu", [False, True])
def test_stacked_linear_kernel_dense_and_sparse_paths_agree(shape, relu):
    """Whichever blocks go dense, the output, the input's and the bias's gradients are the
    same bits; the weight's gradient (its sums ordered differently) agrees to rounding."""
    x, weight, bias, kept, grad = _case(*shape, density=0.4)
    values = kept.compact(weight)
    runs = [_run(x, values, bias, kept, relu, grad, dense_above=d) for d in (0.0, 0.5, 2.0)]
    for other in runs[1:]:
        for i in (0, 1, 3):
            assert torch.equal(other[i], runs[0][i])
        torch.testing.assert_close(other[2], runs[0][2], rtol=1e-5, atol=1e-5)


@requires_ops
@pytest.mark.parametrize("relu", [False, True])
def test_stacked_linear_kernel_compact_is_the_dense_layer_with_zeros(relu):
    """A compact weight computes what its dense weight with 0 at the pruned weights does: with
    every block dense, bit for bit (a pruned weight's 0 adds exactly nothing), its weight
    gradient the dense one's kept entries."""
    x, weight, bias, kept, grad = _case(3, 40, 30, 70, density=0.5)
    zeroed = weight.masked_fill(~kept.mask, 0)
    dense = _run(x, zeroed, bias, None, relu, grad, dense_above=0.0)
    compact = _run(x, kept.compact(weight), bias, kept, relu, grad, dense_above=0.0)
    for i in (0, 1, 3):
        assert torch.equal(compact[i], dense[i])
    assert torch.equal(compact[2], dense[2][kept.mask])
    assert torch.equal(kept.expand(compact[2]), dense[2].masked_fill(~kept.mask, 0))


@requires_ops
def test_stacked_linear_kernel_whole_compact_weight_is_dense():
    x, weight, bias, _, grad = _case(2, 16, 12, 9)
    whole = KeptWeights.from_mask(torch.ones(2, 12, 16, dtype=torch.bool))
    dense = _run(x, weight, bias, None, True, grad)
    compact = _run(x, whole.compact(weight), bias, whole, True, grad)
    for i in (0, 1, 3):
        assert torch.equal(compact[i], dense[i])
    assert torch.equal(whole.expand(compact[2]), dense[2])


@requires_ops
@pytest.mark.parametrize("shape", [(2, 0, 4, 3), (2, 4, 3, 0), (2, 4, 0, 3)], ids=str)
def test_stacked_linear_kernel_empty_sizes(shape):
    x, weight, bias, kept, grad = _case(*shape)
    got = _run(x, kept.compact(weight), bias, kept, True, grad)
    want = _run(x, kept.compact(weight), bias, kept, True, grad, backend="reference")
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w)


def test_kept_weights_lists():
    mask = torch.tensor([[[1, 0, 1], [0, 0, 0]], [[1, 1, 1], [0, 1, 0]]], dtype=torch.bool)
    kept = KeptWeights.from_mask(mask)
    assert kept.row_ptr.tolist() == [0, 2, 2, 5, 6]
    assert kept.row_cols.tolist() == [0, 2, 0, 1, 2, 1]
    # By column: model 0's columns 0, 1, 2, then model 1's.
    assert kept.col_ptr.tolist() == [0, 1, 1, 2, 3, 5, 6]
    assert kept.col_rows.tolist() == [0, 0, 0, 0, 1, 0]
    assert kept.col_vals.tolist() == [0, 1, 2, 3, 5, 4]
    weight = torch.arange(12.0).view(2, 2, 3) + 1
    values = kept.compact(weight)
    assert values.tolist() == [1, 3, 7, 8, 9, 11]
    assert torch.equal(kept.expand(values), weight * mask)
    with pytest.raises(ValueError, match="mask must be a bool"):
        KeptWeights.from_mask(mask.float())


@requires_ops
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_kept_weight_lists_kernel_matches_torch(density, monkeypatch):
    from recallprune.ops import stacked_linear as module

    mask = torch.rand(5, 13, 9, generator=torch.Generator().manual_seed(3)) < density
    if 0 < density < 1:
        mask[1, 2] = False
        mask[2, :, 4] = True
    kernel = KeptWeights.from_mask(mask)
    monkeypatch.setattr(module, "has_ops", lambda device=None: False)
    torch_lists = KeptWeights.from_mask(mask)
    for name in ("row_ptr", "row_cols", "col_ptr", "col_rows", "col_vals"):
        a, b = getattr(kernel, name), getattr(torch_lists, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    torch.library.opcheck(ops.kept_weight_lists.default, (mask,))
    with pytest.raises(RuntimeError, match="mask must be a bool"):
        ops.kept_weight_lists(mask.float())


@requires_ops
def test_opcheck_stacked_linear():
    x, weight, bias, kept, grad = _case(3, 10, 8, 20)
    values = kept.compact(weight)
    lists = (kept.row_ptr, kept.row_cols)
    columns = (kept.col_ptr, kept.col_rows, kept.col_vals)
    output = ops.stacked_linear(x, values, bias, *lists, True, 0.5)
    calls = [
        (ops.stacked_linear.default, (x, weight, bias, None, None, False, 0.5)),
        (ops.stacked_linear.default, (x, values, bias, *lists, True, 0.5)),
        (ops.stacked_linear.default, (x, values, None, *lists, False, 2.0)),
        (
            ops.stacked_linear_backward.default,
            (grad, x, values, output, *lists, *columns, [True, True, True], 0.5),
        ),
        (
            ops.stacked_linear_backward.default,
            (grad, x, weight, None, None, None, None, None, None, [False, True, True], 0.5),
        ),
    ]
    for op, args in calls:
        torch.library.opcheck(op, args)


@requires_ops
def test_stacked_linear_errors():
    x, weight, bias, kept, grad = _case(2, 6, 5, 4)
    values = kept.compact(weight)
    lists = (kept.row_ptr, kept.row_cols)
    with pytest.raises(RuntimeError, match="input must be a contiguous float32"):
        ops.stacked_linear(x.double(), weight, bias, None, None)
    with pytest.raises(RuntimeError, match=r"weight must be a contiguous float32 \[B, out, in\]"):
        ops.stacked_linear(x, weight[:, :, :3].contiguous(), bias, None, None)
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.stacked_linear(x, weight, bias[:, :2].contiguous(), None, None)
    with pytest.raises(RuntimeError, match="given together"):
        ops.stacked_linear(x, values, bias, kept.row_ptr, None)
    with pytest.raises(RuntimeError, match="compact weight must be"):
        ops.stacked_linear(x, values[:-1].contiguous(), bias, *lists)
    with pytest.raises(RuntimeError, match="dense_above"):
        ops.stacked_linear(x, weight, bias, None, None, False, -1.0)
    bad = kept.row_ptr.clone()
    bad[3] = bad[4] + 1
    with pytest.raises(RuntimeError, match="row_ptr must not decrease"):
        ops.stacked_linear(x, values, bias, bad, kept.row_cols)
    for change in ("range", "order"):
        cols = kept.row_cols.clone()
        if change == "range":
            cols[-1] = 6
        else:
            counts = kept.row_ptr.diff()  # a row of a pruned model (a whole row is not read)
            row = int(torch.nonzero((counts >= 2) & (counts < 6))[0])
            first = int(kept.row_ptr[row])
            cols[first], cols[first + 1] = cols[first + 1].item(), cols[first].item()
        for dense_above in (0.0, 2.0):  # read by the dense blocks and by the sparse rows
            with pytest.raises(RuntimeError, match="ascending columns"):
                ops.stacked_linear(x, values, bias, kept.row_ptr, cols, False, dense_above)
            with pytest.raises(RuntimeError, match="ascending columns"):
                ops.stacked_linear_backward(
                    grad, x, values, None, kept.row_ptr, cols, None, None, None,
                    [False, True, False], dense_above,
                )  # fmt: skip
    rows = kept.col_rows.clone()
    rows[-1] = 5
    with pytest.raises(RuntimeError, match="ascending rows"):
        ops.stacked_linear_backward(
            grad, x, values, None, *lists, kept.col_ptr, rows, kept.col_vals,
            [True, False, False], 2.0,
        )  # fmt: skip
    vals = kept.col_vals.clone()
    vals[0] = values.numel()
    with pytest.raises(RuntimeError, match="positions of their values"):
        ops.stacked_linear_backward(
            grad, x, values, None, *lists, kept.col_ptr, kept.col_rows, vals,
            [True, False, False], 2.0,
        )  # fmt: skip
    with pytest.raises(RuntimeError, match="by column"):
        ops.stacked_linear_backward(
            grad, x, values, None, *lists, None, None, None, [True, False, False], 0.5
        )
    with pytest.raises(ValueError, match="kept weights' values"):
        stacked_linear(x, weight, bias, kept)
    with pytest.raises(RuntimeError, match="float32 CPU tensors only"):
        stacked_linear(x.double(), weight.double(), bias.double(), backend="kernel")


@requires_ops
def test_stacked_linear_auto_backend_follows_the_instruction_set(monkeypatch):
    """backend="auto" runs the kernels where torch uses AVX2 or AVX-512 and torch's products
    on its portable instruction set (where they are the faster)."""
    from recallprune.ops import stacked_linear as module

    x, weight, bias, _, _ = _case(2, 16, 12, 9)
    calls = []
    monkeypatch.setattr(
        module._StackedLinear, "apply", lambda *a: calls.append(a) or torch.zeros(2, 12, 9)
    )
    for vector, expected in ((True, 1), (False, 0)):
        monkeypatch.setattr(module, "_vector_cpu", lambda vector=vector: vector)
        calls.clear()
        stacked_linear(x, weight, bias)
        assert len(calls) == expected
        calls.clear()
        stacked_linear(x, weight, bias, backend="kernel")
        assert len(calls) == 1


def _stacked_mlp(seed=0, models=4):
    torch.manual_seed(seed)
    return StackedMLP([MLP(12, 3, width=0.1) for _ in range(models)])


def test_stacked_model_compact_and_expand():
    model = _stacked_mlp()
    masks = {
        name: torch.rand(p.shape) < 0.4
        for name, p in model.named_parameters()
        if name.endswith("weight")
    }
    masks["fc1.weight"][0] = True  # a whole model
    with torch.no_grad():
        for name, mask in masks.items():
            model.get_parameter(name).mul_(mask)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    x = torch.randn(4, 9, 12)
    expected = model(x).detach()
    model.compact(masks)
    names = {name for name, _ in model.named_parameters()}
    assert "fc1.kept_weight" in names and "fc1.weight" not in names
    assert model.fc1.kept_weight.numel() == int(masks["fc1.weight"].sum())
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    named = model.dense_named({"fc2.kept_weight": model.fc2.kept_weight.detach(), "x": x})
    assert torch.equal(named["fc2.weight"], before["fc2.weight"]) and named["x"] is x
    model.expand()
    assert [name for name, _ in model.named_parameters()] == list(before)  # in order
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])


def test_stacked_model_compacts_only_below_the_fraction():
    model = _stacked_mlp()
    masks = {"fc1.weight": torch.rand(4, 30, 12) < 0.9, "fc2.weight": torch.rand(4, 10, 30) < 0.2}
    masks["fc1.weight"][0] = True
    model.compact(masks, below=0.6)
    assert model.fc1.kept is None and model.fc2.kept is not None


@requires_ops
def test_compact_training_follows_masked_dense_training(monkeypatch):
    """Training compact weights is training the masked dense ones: with every block dense,
    the same gradients and the same updates (UndecayedSGD per element), so the same weights
    bit for bit."""
    from recallprune.optim import UndecayedSGD, decay_param_groups
    from recallprune.study import stacked as stacked_module

    def every_block_dense(*args, **kwargs):
        return stacked_linear(*args, **{**kwargs, "dense_above": 0.0})

    monkeypatch.setattr(stacked_module, "stacked_linear", every_block_dense)
    trained = []
    for compact in (False, True):
        model = _stacked_mlp(seed=3)
        masks = {
            "fc1.weight": torch.rand(4, 30, 12, generator=torch.Generator().manual_seed(1)) < 0.5,
            "fc2.weight": torch.rand(4, 10, 30, generator=torch.Generator().manual_seed(2)) < 0.3,
        }
        with torch.no_grad():
            for name, mask in masks.items():
                model.get_parameter(name).mul_(mask)
        if compact:
            model.compact(masks)
        optimizer = UndecayedSGD(decay_param_groups(model, 5e-4), lr=0.1, momentum=0.9)
        parameters = dict(model.named_parameters())
        for name, mask in masks.items():
            if name in parameters:
                optimizer.set_mask(parameters[name], mask)
        g = torch.Generator().manual_seed(4)
        for _ in range(5):
            x = torch.randn(4, 8, 12, generator=g)
            y = torch.randint(0, 3, (4, 8), generator=g)
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
            loss.backward()
            optimizer.step()
        model.expand()
        trained.append({name: p.detach().clone() for name, p in model.named_parameters()})
    for name, p in trained[0].items():
        assert torch.equal(trained[1][name], p), name
    assert not torch.equal(trained[0]["fc1.weight"], _stacked_mlp(seed=3).fc1.weight)


@requires_ops
def test_stacked_linear_kernel_sparse_weight_grad_is_each_weights_own_sum():
    """A sparse row's weight gradient is, weight by weight, the same sum (the kernels take a
    vector's worth of the row's weights at once and the rest one by one): the weights two
    layers share get the same bits however many others their rows keep before them."""
    g = torch.Generator().manual_seed(5)
    models, inputs, out, samples = 2, 90, 4, 70
    x = torch.randn(models, inputs, samples, generator=g)
    weight = torch.randn(models, out, inputs, generator=g)
    grad = torch.randn(models, out, samples, generator=g)
    shared = torch.rand(models, out, inputs, generator=g) < 0.3
    more = shared | (torch.rand(models, out, inputs, generator=g) < 0.4)
    results = []
    for mask in (shared, more):
        kept = KeptWeights.from_mask(mask)
        _, grad_weight, _ = ops.stacked_linear_backward(
            grad, x, kept.compact(weight), None, kept.row_ptr, kept.row_cols,
            None, None, None, [False, True, False], 2.0,
        )  # fmt: skip
        results.append(kept.expand(grad_weight))
    assert (more.sum(dim=2) >= 32).any()  # rows of several vectors' worth of weights
    assert torch.equal(results[0][shared], results[1][shared])
    torch.testing.assert_close(
        results[0], (grad @ x.transpose(1, 2)) * shared, rtol=1e-5, atol=1e-4
    )
