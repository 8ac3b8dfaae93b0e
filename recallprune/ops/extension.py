"""Loads the compiled kernels (``recallprune._C``) once, remembers why they failed, and chooses
between them and the pure-torch reference.

Everything in recallprune works without the kernels through :mod:`recallprune.ops.reference`;
:func:`has_ops` says whether they are there (and, on a GPU, built for its architecture),
:func:`load_error` and :func:`kernel_image_problem` why not. Set
``RECALLPRUNE_DISABLE_EXT=1`` to force the fallback. :func:`resolve_backend` is the one choice
of ``backend="auto" | "kernel" | "reference"`` that every op wrapper makes.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

BACKENDS = ("auto", "kernel", "reference")

# The ops with kernels per device (confusion_matrix is composed of confusion_update_).
_OPS = (
    "undecayed_sgd_",
    "undecayed_sgd_.tensor",
    "confusion_update_",
    "confusion_update_stacked_",
)
_KERNEL_DEVICE_TYPES = {"cpu": "CPU", "cuda": "CUDA"}
_DISABLED = "disabled by RECALLPRUNE_DISABLE_EXT=1"

_loaded = False
_load_error: str | None = None
_fake_registrations: list[Callable[[], None]] = []


def _load() -> None:
    global _loaded, _load_error
    if _loaded or _load_error is not None:
        return
    if os.environ.get("RECALLPRUNE_DISABLE_EXT", "0").strip().lower() in ("1", "true", "yes", "on"):
        _load_error = _DISABLED
        return
    try:
        from recallprune import _C  # noqa: F401  (loading registers the ops)
    except (ImportError, OSError) as error:
        _load_error = f"{type(error).__name__}: {error}"
        return
    _loaded = True
    for register in _fake_registrations:
        register()


def register_fakes(register: Callable[[], None]) -> Callable[[], None]:
    """Run ``register`` (an op wrapper's ``torch.library.register_fake`` calls) once the ops
    exist: when the library loads, or now if it has. Usable as a decorator."""
    if _loaded:
        register()
    else:
        _fake_registrations.append(register)
    return register


def has_ops(device: torch.device | str | None = None) -> bool:
    """Whether the compiled kernels are loaded and, when ``device`` is given, can run there:
    kernels for its type and, on a GPU, code for its architecture (checked once per GPU;
    :func:`kernel_image_problem` says what is missing)."""
    _load()
    if not _loaded:
        return False
    if device is None:
        return True
    device = torch.device(device)
    if not _has_kernels_for(device.type):
        return False
    return device.type != "cuda" or kernel_image_problem(device) is None


def kernel_image_problem(device: torch.device | str) -> str | None:
    """Why the CUDA kernels, although built, cannot run on the GPU ``device`` (a GPU whose
    architecture the build left out), or ``None`` when they can. Checked once per GPU."""
    return _kernel_image_problem(_gpu_index(torch.device(device)))


def _gpu_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _kernel_image_problem(index: int) -> str | None:
    problem = _probe_kernel_image(index)
    if not problem:
        return None
    major, minor = torch.cuda.get_device_capability(index)
    name = torch.cuda.get_device_name(index)
    return (
        f"recallprune._C holds no code for cuda:{index} ({name}, compute capability "
        f"{major}.{minor}, sm_{major}{minor}): {problem}. Rebuild it for this GPU: "
        f'TORCH_CUDA_ARCH_LIST="{major}.{minor}" `make setup` (in a checkout, after `make '
        f"clean`), or the same variable with `pip install --no-build-isolation "
        f"--force-reinstall --no-deps recallprune`"
    )


def _probe_kernel_image(index: int) -> str:
    """The CUDA runtime's reason why the library's kernels cannot run on GPU ``index``
    ("" when they can), from a query of one of its kernels."""
    return torch.ops.recallprune.cuda_kernel_image_problem(index)


@functools.cache
def _has_kernels_for(device_type: str) -> bool:
    key = _KERNEL_DEVICE_TYPES.get(device_type)
    if key is None:
        return False
    return all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"recallprune::{op}", key) for op in _OPS
    )


def load_error() -> str | None:
    """Why the compiled kernels are not available (``None`` when they are)."""
    _load()
    return _load_error


def check_backend(backend: str) -> None:
    """Raise ValueError unless ``backend`` is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, device: torch.device | str, what: str) -> str:
    """``"kernel"`` or ``"reference"``: which implementation runs ``what`` on ``device``.

    ``"auto"`` takes the kernels where they are loaded for the device's type, ``"kernel"``
    insists on them (:func:`require_ops` says what is missing and what to do), and
    ``"reference"`` is the pure-torch implementation.
    """
    if backend == "auto":
        if has_ops(device):
            return "kernel"
        _warn_if_built_for_other_gpus(device)
        return "reference"
    if backend == "kernel":
        require_ops(device, what)
        return "kernel"
    check_backend(backend)
    return "reference"


_warned_gpus: set[int] = set()


def _warn_if_built_for_other_gpus(device: torch.device | str) -> None:
    """Once per GPU whose architecture the build left out: say so, since ``backend="auto"``
    falls back to the (slower) reference there."""
    device = torch.device(device)
    if device.type != "cuda" or not _loaded or not _has_kernels_for("cuda"):
        return
    problem = kernel_image_problem(device)
    index = _gpu_index(device)
    if problem is not None and index not in _warned_gpus:
        _warned_gpus.add(index)
        warnings.warn(
            f"{problem}. Until then recallprune runs its pure-torch reference there.",
            RuntimeWarning,
            stacklevel=4,
        )


def require_ops(device: torch.device | str, what: str) -> None:
    """Raise a RuntimeError that says why and what to do if the kernels for ``device`` are
    missing."""
    if has_ops(device):
        return
    device = torch.device(device)
    if _load_error is not None:
        reason = f"the extension recallprune._C did not load ({_load_error})"
    elif device.type not in _KERNEL_DEVICE_TYPES:
        reason = f"recallprune has no kernels for {device.type} tensors"
    elif device.type == "cuda" and _has_kernels_for("cuda"):
        raise RuntimeError(
            f"{what}: backend='kernel' cannot run on {device}: {kernel_image_problem(device)}. "
            "Or use backend='auto' (the reference where the kernels cannot run) or 'reference'."
        )
    else:
        reason = f"recallprune._C was built without {device.type.upper()} kernels"
    raise RuntimeError(
        f"{what}: backend='kernel' needs the compiled kernels for {device.type}, but {reason}. "
        f"{_advice(device)}Or use backend='auto' (the kernels where present) or 'reference' "
        "(pure torch)."
    )


def _advice(device: torch.device) -> str:
    """What to do to get the kernels, for a source checkout or an installed package."""
    if _load_error == _DISABLED:
        return "Unset RECALLPRUNE_DISABLE_EXT to load them. "
    if device.type not in _KERNEL_DEVICE_TYPES:
        return f"Move the tensors to one of {tuple(_KERNEL_DEVICE_TYPES)}. "
    cuda = device.type == "cuda"
    needs = " with a CUDA toolkit (nvcc) found and a CUDA build of torch" if cuda else ""
    checkout = source_checkout()
    if checkout is not None:
        return (
            f"Build them in the checkout {checkout}{needs}: `make setup`, or "
            f"`pip install --no-build-isolation -e .` there, against the torch in use "
            f"({torch.__version__}). "
        )
    return (
        f"Reinstall recallprune built for the torch in use ({torch.__version__}){needs}: "
        "`pip install --force-reinstall --no-deps --no-build-isolation --no-binary recallprune "
        "recallprune` compiles it against this torch. "
    )


def source_checkout() -> Path | None:
    """The source tree recallprune is imported from (an editable install or ``PYTHONPATH``),
    or ``None`` for an installed package."""
    root = Path(__file__).resolve().parents[2]
    if (root / "setup.py").is_file() and (root / "csrc").is_dir():
        return root
    return None
