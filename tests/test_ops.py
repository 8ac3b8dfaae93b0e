"""The op layer: each op through torch.library.opcheck with its wrapper's arguments, the loader,
the choice between kernel and reference, and the pure-torch fallback."""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import recallprune
from recallprune import ConfusionCounter, UndecayedSGD, confusion_matrix
from recallprune.ops import extension
from recallprune.ops.confusion import kernel_batch
from recallprune.ops.undecayed_sgd import choose_backend, kernel_call, pack_keep_mask

from .conftest import requires_ops

# -- opcheck: the ops as their wrappers call them ----------------------------------------------


def _sgd_calls(device):
    """(op, args, kwargs) as ``recallprune.ops.undecayed_sgd_`` makes them."""
    generator = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)

    hyper = dict(
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
    yield kernel_call(params, grads, bufs, keeps, decays, sums, **hyper)
    if torch.device(device).type == "cpu":  # packed keep masks: the CPU kernel's
        packed = [
            None if k is None else pack_keep_mask(p, k) for p, k in zip(params, keeps, strict=True)
        ]
        yield kernel_call(
            params, grads, bufs, packed, decays, sums, keep_masks_packed=True, **hyper
        )
    no_momentum = dict(hyper, momentum=0.0, nesterov=False)
    yield kernel_call(params, grads, [], [], [], [], **no_momentum)
    half = [p.half() for p in params]
    half_grads, half_bufs = [g.half() for g in grads], [b.half() for b in bufs]
    yield kernel_call(half, half_grads, half_bufs, keeps, [], sums, **hyper)
    # AMP scaling, given as GradScaler hands it over (0-dim); the wrapper makes it [1].
    amp = dict(grad_scale=torch.tensor(2.0, device=device), found_inf=torch.tensor(0.0))
    yield kernel_call(params, grads, bufs, [], [], [], **hyper, **amp)
    # A tensor lr or weight decay selects the tensor overload on every device; the float one
    # goes along as a float64 CPU tensor, and nothing is read in Python.
    tensor_lr = dict(hyper, lr=torch.tensor(0.1, device=device))
    op, args, kwargs = kernel_call(params, grads, bufs, keeps, [], [], **tensor_lr)
    assert op._overloadname == "tensor"
    assert kwargs["lr"].device.type == device
    assert kwargs["weight_decay"].dtype == torch.float64 and kwargs["weight_decay"].is_cpu
    yield op, args, kwargs
    tensor_decay = dict(hyper, weight_decay=torch.tensor([1e-2], device=device))
    op, args, kwargs = kernel_call(params, grads, bufs, keeps, decays, [], **tensor_decay)
    assert op._overloadname == "tensor" and kwargs["weight_decay"].device.type == device
    yield op, args, kwargs
    yield op, args, dict(kwargs, lr=torch.tensor([0.1], device=device))


@requires_ops
def test_opcheck_undecayed_sgd(kernel_device):
    for op, args, kwargs in _sgd_calls(kernel_device):
        torch.library.opcheck(op, args, kwargs)


@requires_ops
def test_opcheck_confusion_ops(kernel_device):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=generator).to(kernel_device)
    target = torch.randint(0, 7, (40, 1), generator=generator).to(kernel_device)
    batches = [
        (x.view(40, 6, 1), target, 6),
        (x.argmax(1, keepdim=True), target, None),
        # Marshalled by the wrapper: int8 labels widened, strided logits made contiguous.
        (x.t().contiguous().t().view(40, 6, 1), target.to(torch.int8), None),
        (x.argmax(1, keepdim=True).to(torch.uint8), target.to(torch.int16), 3),
    ]
    for batch, labels, ignore_index in batches:
        batch, labels = kernel_batch(batch, labels)
        counts = torch.zeros(36, dtype=torch.int64, device=kernel_device)
        invalid = torch.zeros(1, dtype=torch.int64, device=kernel_device)
        torch.library.opcheck(
            torch.ops.recallprune.confusion_update_.default,
            (counts, invalid, batch, labels, 6, ignore_index),
        )
        torch.library.opcheck(
            torch.ops.recallprune.confusion_matrix.default, (batch, labels, 6, ignore_index)
        )
        # The same batch as three models' (the stacked op), each its own copy.
        stacked = batch.unsqueeze(0).repeat(3, *([1] * batch.dim()))
        torch.library.opcheck(
            torch.ops.recallprune.confusion_update_stacked_.default,
            (
                torch.zeros(3, 36, dtype=torch.int64, device=kernel_device),
                torch.zeros(3, dtype=torch.int64, device=kernel_device),
                stacked,
                labels.unsqueeze(0).repeat(3, 1, 1),
                6,
                ignore_index,
            ),
        )


@requires_ops
def test_wrappers_run_the_kernels_and_match_the_reference(kernel_device):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(300, 9, generator=generator).to(kernel_device)
    target = torch.randint(-1, 10, (300,), generator=generator).to(torch.int16).to(kernel_device)
    results = {}
    for backend in ("kernel", "reference"):
        counts, invalid = recallprune.ops.confusion_matrix(
            x.view(300, 9, 1), target.view(300, 1), 9, 4, backend
        )
        assert counts.shape == (9, 9) and invalid.shape == (1,)
        results[backend] = (counts, invalid)
    assert torch.equal(results["kernel"][0], results["reference"][0])
    assert torch.equal(results["kernel"][1], results["reference"][1])
    assert int(results["kernel"][1]) > 0  # the -1 labels


@requires_ops
def test_ops_registered_for_cpu_and_schema():
    assert recallprune.has_ops() and recallprune.has_ops("cpu")
    assert recallprune.load_error() is None
    schema = str(torch.ops.recallprune.undecayed_sgd_.default._schema)
    assert "Tensor(a!)[] params" in schema and "Tensor?[] keep_masks" in schema
    assert not recallprune.has_ops("meta")


# -- the choice between kernel and reference ----------------------------------------------------


@pytest.fixture
def without_kernels(monkeypatch):
    """The loader as it is when recallprune._C failed to load."""
    monkeypatch.setattr(extension, "_loaded", False)
    monkeypatch.setattr(extension, "_load_error", "ImportError: libfoo.so missing")


def test_the_backend_choice(monkeypatch, without_kernels):
    resolve = extension.resolve_backend
    assert resolve("auto", "cpu", "X") == "reference"
    assert resolve("reference", "cpu", "X") == "reference"
    with pytest.raises(RuntimeError, match="^X: backend='kernel' needs the compiled kernels"):
        resolve("kernel", "cpu", "X")
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'kernel', 'ref"):
        resolve("cuda", "cpu", "X")
    monkeypatch.setattr(extension, "_loaded", True)
    monkeypatch.setattr(extension, "_load_error", None)
    monkeypatch.setattr(extension, "_has_kernels_for", lambda device_type: device_type == "cpu")
    assert resolve("auto", "cpu", "X") == "kernel"
    assert resolve("kernel", torch.device("cpu"), "X") == "kernel"
    assert resolve("reference", "cpu", "X") == "reference"
    assert resolve("auto", "meta", "X") == "reference"
    with pytest.raises(RuntimeError, match="has no kernels for meta tensors"):
        resolve("kernel", "meta", "X")
    # A differentiable step runs the reference; asking for the kernel then is an error.
    assert choose_backend("auto", torch.device("cpu"), differentiable=True) == "reference"
    with pytest.raises(RuntimeError, match="does not support differentiable=True"):
        choose_backend("kernel", torch.device("cpu"), differentiable=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        choose_backend("fast", torch.device("cpu"), differentiable=True)


@pytest.fixture
def gpu_without_code(monkeypatch):
    """Kernels built for CUDA, and a GPU (cuda:0, a T4) whose architecture the build left
    out, as the CUDA runtime reports it."""
    monkeypatch.setattr(extension, "_loaded", True)
    monkeypatch.setattr(extension, "_load_error", None)
    monkeypatch.setattr(extension, "_has_kernels_for", lambda device_type: True)
    probes = []

    def probe(index):
        probes.append(index)
        return "no kernel image is available for execution on the device"

    monkeypatch.setattr(extension, "_probe_kernel_image", probe)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(extension, "_warned_gpus", set())
    extension._kernel_image_problem.cache_clear()
    yield probes
    extension._kernel_image_problem.cache_clear()


def test_a_gpu_the_build_left_out_falls_back_with_one_warning(gpu_without_code):
    resolve = extension.resolve_backend
    assert not recallprune.has_ops("cuda:0") and recallprune.has_ops("cpu")
    with pytest.warns(RuntimeWarning) as caught:
        assert resolve("auto", torch.device("cuda", 0), "ConfusionCounter") == "reference"
        assert resolve("auto", "cuda", "UndecayedSGD") == "reference"  # no second warning
    (warning,) = caught
    message = str(warning.message)
    assert "cuda:0 (Tesla T4, compute capability 7.5, sm_75)" in message
    assert "no kernel image is available" in message
    assert 'TORCH_CUDA_ARCH_LIST="7.5"' in message and "reference there" in message
    with pytest.raises(RuntimeError) as error:
        resolve("kernel", "cuda:0", "UndecayedSGD")
    assert str(error.value).startswith("UndecayedSGD: backend='kernel' cannot run on cuda:0: ")
    assert 'TORCH_CUDA_ARCH_LIST="7.5"' in str(error.value)
    assert resolve("auto", "cpu", "X") == "kernel"
    assert gpu_without_code == [0]  # probed once for the GPU, however often asked


def test_a_gpu_the_build_covers_runs_the_kernels(gpu_without_code, monkeypatch):
    monkeypatch.setattr(extension, "_probe_kernel_image", lambda index: "")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert extension.resolve_backend("auto", "cuda:1", "X") == "kernel"
    assert extension.kernel_image_problem("cuda:1") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@requires_ops
def test_the_probe_finds_code_for_this_gpu():
    """This build runs on the GPU at hand; were it left out, the counter would still count
    (through the reference) after one warning."""
    assert extension.kernel_image_problem("cuda") is None
    assert recallprune.has_ops("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_counter_falls_back_on_a_gpu_the_build_left_out(gpu_without_code):
    counter = ConfusionCounter(3, device="cuda")
    with pytest.warns(RuntimeWarning, match="compute capability 7.5"):
        counter.update(
            torch.tensor([0, 1, 2], device="cuda"), torch.tensor([0, 2, 2], device="cuda")
        )
    assert counter.compute().cpu().tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]
    with pytest.raises(RuntimeError, match="cannot run on cuda"):
        ConfusionCounter(3, device="cuda", backend="kernel").update(
            torch.tensor([0], device="cuda"), torch.tensor([0], device="cuda")
        )


def test_every_caller_goes_through_the_one_choice(without_kernels):
    """The optimizer, the counter and the functional confusion matrix refuse backend='kernel'
    with the loader's reason when the kernels are missing, and run the reference on 'auto'."""
    w = nn.Parameter(torch.ones(4))
    w.grad = torch.ones(4)
    callers = {
        "UndecayedSGD": lambda backend: UndecayedSGD([w], lr=0.5, backend=backend).step(),
        "ConfusionCounter": lambda backend: ConfusionCounter(3, backend=backend).update(
            torch.tensor([0, 1]), torch.tensor([0, 2])
        ),
        "confusion_matrix": lambda backend: confusion_matrix(
            torch.tensor([0, 1]), torch.tensor([0, 2]), 3, backend=backend
        ),
    }
    for what, call in callers.items():
        with pytest.raises(RuntimeError, match=rf"^{what}: .* \(ImportError: libfoo.so missing\)"):
            call("kernel")
        call("auto")
    assert torch.equal(w.detach(), torch.full((4,), 0.5))  # the 'auto' step ran


def test_the_advice_for_a_checkout_and_for_an_installed_package(monkeypatch, without_kernels):
    monkeypatch.setattr(extension, "source_checkout", lambda: "/src/recallprune")
    with pytest.raises(RuntimeError) as checkout:
        extension.require_ops("cpu", "UndecayedSGD")
    message = str(checkout.value)
    assert "did not load (ImportError: libfoo.so missing)" in message
    assert "checkout /src/recallprune" in message and "`make setup`" in message
    assert "`pip install --no-build-isolation -e .`" in message
    assert torch.__version__ in message and "backend='auto'" in message

    monkeypatch.setattr(extension, "source_checkout", lambda: None)
    with pytest.raises(RuntimeError) as installed:
        extension.require_ops("cpu", "UndecayedSGD")
    message = str(installed.value)
    assert "Reinstall recallprune built for the torch in use" in message
    assert torch.__version__ in message and "--no-build-isolation" in message
    assert "make setup" not in message and "checkout" not in message

    # Loaded, but built without the CUDA kernels.
    monkeypatch.setattr(extension, "_loaded", True)
    monkeypatch.setattr(extension, "_load_error", None)
    monkeypatch.setattr(extension, "_has_kernels_for", lambda device_type: device_type == "cpu")
    with pytest.raises(RuntimeError, match="built without CUDA kernels. Reinstall .* CUDA toolkit"):
        extension.require_ops("cuda", "ConfusionCounter")


def test_this_checkout_is_recognised():
    # The tests run from the source tree (PYTHONPATH or an editable install).
    checkout = extension.source_checkout()
    assert checkout is not None and (checkout / "csrc").is_dir()
    assert os.path.samefile(checkout / "recallprune", os.path.dirname(recallprune.__file__))


def test_fakes_registered_before_the_library_loads_run_when_it_does(monkeypatch):
    calls = []
    monkeypatch.setattr(extension, "_fake_registrations", [])
    monkeypatch.setattr(extension, "_loaded", False)
    monkeypatch.setattr(extension, "_load_error", None)
    monkeypatch.setenv("RECALLPRUNE_DISABLE_EXT", "0")
    register = extension.register_fakes(lambda: calls.append("registered"))
    assert calls == [] and extension._fake_registrations == [register]
    try:
        import recallprune._C  # noqa: F401
    except ImportError:
        pytest.skip("needs the compiled extension")
    extension._load()
    assert calls == ["registered"]
    extension.register_fakes(lambda: calls.append("at once"))  # loaded: runs now
    assert calls == ["registered", "at once"]


# -- the fallback --------------------------------------------------------------------------------


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
            a.grad = torch.randn(100)
            UndecayedSGD([a], lr=0.1, backend="kernel").step()
        except RuntimeError as error:
            assert "RECALLPRUNE_DISABLE_EXT=1" in str(error), error
            assert "Unset RECALLPRUNE_DISABLE_EXT" in str(error), error
            print("kernel refused")
        """,
        RECALLPRUNE_DISABLE_EXT="1",
    )
    assert result.returncode == 0, result.stderr
    assert "kernel refused" in result.stdout
