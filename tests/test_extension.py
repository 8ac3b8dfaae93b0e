"""The compiled extension: op registration (opcheck), and the pure-torch fallback."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import recallprune
from recallprune import _extension

from .conftest import requires_ops


def _sgd_op_samples(device):
    generator = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)

    kwargs = dict(
        lr=0.1,
        momentum=0.9,
        dampening=0.0,
        weight_decay=1e-2,
        nesterov=True,
        maximize=False,
        is_first_step=False,
    )
    shapes = [(5, 3), (17,), (0,)]
    params = [rand(*s) for s in shapes]
    grads = [rand(*s) for s in shapes]
    bufs = [rand(*s) for s in shapes]
    keeps = [rand(5, 3) > 0, None, torch.ones(0, dtype=torch.bool, device=device)]
    decays = [None, rand(17) > 0, None]
    sums = [torch.zeros(shape, device=device) for shape in shapes]
    yield (params, grads, bufs, keeps, decays, sums), kwargs
    yield (params, grads, [], [], [], []), {**kwargs, "momentum": 0.0, "nesterov": False}
    half = [p.half() for p in params]
    yield (half, [g.half() for g in grads], [b.half() for b in bufs], keeps, [], sums), kwargs
    scaled = dict(
        kwargs,
        grad_scale=torch.tensor([2.0], device=device),
        found_inf=torch.tensor([0.0], device=device),
    )
    yield (params, grads, bufs, [], [], []), scaled


@requires_ops
def test_opcheck_undecayed_sgd(kernel_device):
    for args, kwargs in _sgd_op_samples(kernel_device):
        torch.library.opcheck(torch.ops.recallprune.undecayed_sgd_.default, args, kwargs)


@requires_ops
def test_ops_registered_for_cpu_and_schema():
    assert recallprune.has_ops() and recallprune.has_ops("cpu")
    assert recallprune.load_error() is None
    schema = str(torch.ops.recallprune.undecayed_sgd_.default._schema)
    assert "Tensor(a!)[] params" in schema and "Tensor?[] keep_masks" in schema
    assert not recallprune.has_ops("meta")


def _run_python(code, **env):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )


def test_fallback_when_extension_disabled():
    result = _run_python(
        """
        import torch, recallprune
        from recallprune import UndecayedSGD
        assert not recallprune.has_ops() and not recallprune.has_ops("cpu")
        assert "RECALLPRUNE_DISABLE_EXT=1" in recallprune.load_error()
        torch.manual_seed(0)
        a = torch.nn.Parameter(torch.randn(100)); b = torch.nn.Parameter(a.detach().clone())
        ours = UndecayedSGD([a], lr=0.1, momentum=0.9, weight_decay=1e-2)
        ref = torch.optim.SGD([b], lr=0.1, momentum=0.9, weight_decay=1e-2, foreach=False)
        keep = torch.rand(100) > 0.5
        ours.set_mask(a, keep)
        with torch.no_grad():
            b.mul_(keep)
        for _ in range(5):
            g = torch.randn(100)
            a.grad = g.clone(); b.grad = g * keep
            ours.step(); ref.step()
            with torch.no_grad():
                b.mul_(keep); ref.state[b]["momentum_buffer"].mul_(keep)
        assert torch.equal(a, b), (a - b).abs().max()
        try:
            UndecayedSGD([a], lr=0.1, backend="kernel")
            a.grad = torch.randn(100)
            UndecayedSGD([a], lr=0.1, backend="kernel").step()
        except RuntimeError as error:
            assert "RECALLPRUNE_DISABLE_EXT=1" in str(error), error
            print("kernel refused")
        """,
        RECALLPRUNE_DISABLE_EXT="1",
    )
    assert result.returncode == 0, result.stderr
    assert "kernel refused" in result.stdout


def test_require_ops_names_the_reason(monkeypatch):
    monkeypatch.setattr(_extension, "_loaded", False)
    monkeypatch.setattr(_extension, "_load_error", "ImportError: libfoo.so missing")
    assert not _extension.has_ops("cpu")
    with pytest.raises(RuntimeError, match="did not load \\(ImportError: libfoo.so missing\\)"):
        _extension.require_ops("cpu", "UndecayedSGD")
