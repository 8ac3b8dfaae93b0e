"""Loads the compiled kernels (``recallprune._C``) once and remembers why they failed.

Everything in recallprune works without them through the pure-torch reference in
``recallprune._reference``; :func:`has_ops` says whether the kernels are there.
Set ``RECALLPRUNE_DISABLE_EXT=1`` to force the fallback.
"""

from __future__ import annotations

import functools
import os

import torch

_OPS = ("undecayed_sgd_", "undecayed_sgd_.tensor_lr", "confusion_update_")

_loaded = False
_load_error: str | None = None


def _load() -> None:
    global _loaded, _load_error
    if _loaded or _load_error is not None:
        return
    if os.environ.get("RECALLPRUNE_DISABLE_EXT", "0").strip().lower() in ("1", "true", "yes", "on"):
        _load_error = "disabled by RECALLPRUNE_DISABLE_EXT=1"
        return
    try:
        from recallprune import _C  # noqa: F401  (loading registers the ops)
    except (ImportError, OSError) as error:
        _load_error = f"{type(error).__name__}: {error}"
        return
    _register_fakes()
    _loaded = True


def _register_fakes() -> None:
    # Ops that only mutate their inputs: their fake kernels do nothing.
    for op in (
        "recallprune::undecayed_sgd_",
        "recallprune::undecayed_sgd_.tensor_lr",
        "recallprune::confusion_update_",
    ):
        torch.library.register_fake(op)(_mutates_only)

    @torch.library.register_fake("recallprune::confusion_matrix")
    def _(input, target, num_classes, ignore_index=None):
        counts = input.new_empty((num_classes, num_classes), dtype=torch.int64)
        return counts, input.new_empty((1,), dtype=torch.int64)


def _mutates_only(*args, **kwargs) -> None:
    return None


def has_ops(device: torch.device | str | None = None) -> bool:
    """Whether the compiled kernels are loaded (for ``device``'s type, when given)."""
    _load()
    if not _loaded:
        return False
    if device is None:
        return True
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return _has_kernels_for(device_type)


@functools.cache
def _has_kernels_for(device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"recallprune::{op}", key) for op in _OPS
    )


def load_error() -> str | None:
    """Why the compiled kernels are not available (``None`` when they are)."""
    _load()
    return _load_error


def require_ops(device: torch.device | str, what: str) -> None:
    """Raise a clear error if the kernels for ``device`` are missing."""
    if has_ops(device):
        return
    device = torch.device(device)
    if _load_error is not None:
        reason = f"the extension recallprune._C did not load ({_load_error})"
    else:
        reason = f"recallprune._C was built without {device.type.upper()} kernels"
    raise RuntimeError(
        f"{what}: backend='kernel' needs the compiled kernels for {device.type}, but {reason}. "
        "Rebuild with `pip install --no-build-isolation -e .` or use backend='auto' or "
        "'reference'."
    )
