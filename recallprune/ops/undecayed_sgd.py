"""The fused UndecayedSGD op, ``torch.ops.recallprune.undecayed_sgd_`` and its ``tensor_lr``
overload: which backend runs, what the kernels take, the marshalling of the arguments and the
fake kernels.

The math is :func:`recallprune.ops.reference.undecayed_sgd_reference`; the kernels (C++ on
the CPU, CUDA on the GPU) update whole lists of tensors in one call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .extension import check_backend, register_fakes, resolve_backend

KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_LR_TENSOR_DTYPES = (torch.float32, torch.float64)


def choose_backend(backend: str, device: torch.device, differentiable: bool) -> str:
    """``"kernel"`` or ``"reference"`` for the tensors of ``device``; see
    :func:`recallprune.ops.extension.resolve_backend`. A differentiable step (autograd
    through the update) runs the reference."""
    if differentiable:
        if backend == "kernel":
            raise RuntimeError(
                "backend='kernel' does not support differentiable=True; use backend='auto'"
            )
        check_backend(backend)
        return "reference"
    return resolve_backend(backend, device, "UndecayedSGD")


def kernel_takes(param: Tensor, grad: Tensor) -> bool:
    """Whether the op updates ``param`` with ``grad``: dense, contiguous weights (updated in
    place) of a kernel dtype and dense gradients of the weights' dtype and device (copied to
    contiguous memory where they are not). Anything else goes to the reference."""
    return (
        param.is_contiguous()
        and param.layout == torch.strided
        and param.dtype in KERNEL_DTYPES
        and not grad.is_sparse
        and grad.dtype == param.dtype
        and grad.device == param.device
    )


def kernel_call(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    keep_masks: list[Tensor | None],
    decay_masks: list[Tensor | None],
    grad_sums: list[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float | Tensor,
    nesterov: bool,
    maximize: bool,
    is_first_step: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> tuple[torch._ops.OpOverload, tuple, dict]:
    """The overload and arguments of one call of the op on ``params`` (all of one device):
    :func:`undecayed_sgd_` runs it, the tests hand it to ``torch.library.opcheck``.

    A tensor ``lr`` on the GPU with parameters on the GPU selects the ``tensor_lr``
    overload, which reads it on the device as torch's fused SGD does (no host
    synchronisation); elsewhere it is read as a float. ``grad_scale`` and ``found_inf`` go
    to the parameters' device as float32 ``[1]``.
    """
    device = params[0].device
    op = torch.ops.recallprune.undecayed_sgd_.default
    if isinstance(lr, Tensor):
        if lr.device.type != "cpu" and device.type != "cpu":
            op = torch.ops.recallprune.undecayed_sgd_.tensor_lr
            if lr.device != device or lr.dtype not in _LR_TENSOR_DTYPES:
                lr = lr.to(device=device, dtype=torch.float32, non_blocking=True)
            lr = lr.reshape(1)
        else:
            lr = float(lr)
    args = (params, grads, momentum_buffers, keep_masks, decay_masks, grad_sums)
    kwargs = dict(
        lr=lr,
        momentum=float(momentum),
        dampening=float(dampening),
        weight_decay=float(weight_decay),
        nesterov=nesterov,
        maximize=maximize,
        is_first_step=is_first_step,
        grad_scale=None if grad_scale is None else _as_float_scalar(grad_scale, device),
        found_inf=None if found_inf is None else _as_float_scalar(found_inf, device),
    )
    return op, args, kwargs


def undecayed_sgd_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    keep_masks: list[Tensor | None],
    decay_masks: list[Tensor | None],
    grad_sums: list[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float | Tensor,
    nesterov: bool,
    maximize: bool,
    is_first_step: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One fused UndecayedSGD step over ``params`` (one device; at least one tensor), in place.

    The lists are the op's: ``momentum_buffers`` empty when ``momentum == 0``, else one
    contiguous buffer per parameter (filled from the gradient when ``is_first_step``);
    ``keep_masks`` / ``decay_masks`` empty or one bool/uint8 mask or ``None`` per parameter;
    ``grad_sums`` empty or one sum per parameter (float32, float64 for float64 weights).
    Every parameter must pass :func:`kernel_takes`.
    """
    op, args, kwargs = kernel_call(
        params,
        grads,
        momentum_buffers,
        keep_masks,
        decay_masks,
        grad_sums,
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        maximize=maximize,
        is_first_step=is_first_step,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )
    op(*args, **kwargs)


def _as_float_scalar(value: Tensor, device: torch.device) -> Tensor:
    # Non-blocking only towards a GPU: the CPU kernel reads the value at once.
    non_blocking = device.type != "cpu"
    return value.to(device=device, dtype=torch.float32, non_blocking=non_blocking).reshape(1)


@register_fakes
def _register_fakes() -> None:
    # Both overloads only update their inputs in place: their fake kernels do nothing.
    for name in ("recallprune::undecayed_sgd_", "recallprune::undecayed_sgd_.tensor_lr"):
        torch.library.register_fake(name)(_updates_in_place)


def _updates_in_place(*args, **kwargs) -> None:
    return None
