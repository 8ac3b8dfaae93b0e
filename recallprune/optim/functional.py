"""The UndecayedSGD update over lists of tensors: one entry point, two implementations.

``undecayed_sgd`` picks, per device, the fused kernel (``torch.ops.recallprune.undecayed_sgd_``,
C++ on the CPU, CUDA on the GPU) or the pure-torch reference
(``recallprune._reference.undecayed_sgd_reference``). The optimizer class only gathers
state and calls this function.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from .. import _extension
from .._reference import undecayed_sgd_reference

BACKENDS = ("auto", "kernel", "reference")
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _resolve_backend(backend: str, device: torch.device, differentiable: bool) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if differentiable:
        if backend == "kernel":
            raise RuntimeError(
                "backend='kernel' does not support differentiable=True; use backend='auto'"
            )
        return "reference"
    if backend == "auto":
        return "kernel" if _extension.has_ops(device) else "reference"
    if backend == "kernel":
        _extension.require_ops(device, "UndecayedSGD")
    return backend


def _kernel_ready(param: Tensor, grad: Tensor) -> bool:
    # The kernels take dense, contiguous weights (updated in place) and dense gradients of
    # the weights' dtype and device; anything else goes to the reference.
    return (
        param.is_contiguous()
        and param.layout == torch.strided
        and param.dtype in _KERNEL_DTYPES
        and not grad.is_sparse
        and grad.dtype == param.dtype
        and grad.device == param.device
    )


def undecayed_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    keep_masks: list[Tensor | None],
    decay_masks: list[Tensor | None],
    grad_sums: list[Tensor] | None,
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float | Tensor,
    nesterov: bool,
    maximize: bool,
    backend: str = "auto",
    differentiable: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One UndecayedSGD step; see :class:`recallprune.UndecayedSGD` for the math.

    ``momentum_buffers`` holds one entry per parameter when ``momentum != 0`` (``None``
    where none exists yet; created in place) and is ignored otherwise. ``keep_masks`` and
    ``decay_masks`` hold a bool mask or ``None`` per parameter. ``grad_sums``, when given,
    receives the undecayed (data-loss) gradient of every kept element.
    """
    if not params:
        return
    if momentum == 0:
        momentum_buffers = [None] * len(params)
    kwargs = dict(
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        maximize=maximize,
    )

    # Group by (device, dtype, first step?) for the kernels; the rest goes to the reference.
    kernel_groups: dict[tuple, list[int]] = defaultdict(list)
    reference_indices: list[int] = []
    backend_of: dict[torch.device, str] = {}  # resolved once per device
    for i, (param, grad) in enumerate(zip(params, grads, strict=True)):
        device = param.device
        if device not in backend_of:
            backend_of[device] = _resolve_backend(backend, device, differentiable)
        chosen = backend_of[device]
        if chosen == "kernel" and grad.is_sparse:
            if backend == "kernel":
                raise RuntimeError(
                    f"UndecayedSGD: parameter {i} has a sparse gradient, which the fused kernels "
                    "do not take; use backend='reference' (or 'auto') for sparse gradients"
                )
            chosen = "reference"
        if chosen == "kernel" and _kernel_ready(param, grad):
            first = momentum != 0 and momentum_buffers[i] is None
            kernel_groups[(param.device, param.dtype, first)].append(i)
        else:
            reference_indices.append(i)

    for (_, _, first), indices in kernel_groups.items():
        _kernel_step(
            indices,
            params,
            grads,
            momentum_buffers,
            keep_masks,
            decay_masks,
            grad_sums,
            first=first,
            grad_scale=grad_scale,
            found_inf=found_inf,
            **kwargs,
        )

    if reference_indices:
        sub_buffers = [momentum_buffers[i] for i in reference_indices]
        undecayed_sgd_reference(
            [params[i] for i in reference_indices],
            [grads[i] for i in reference_indices],
            sub_buffers,
            [keep_masks[i] for i in reference_indices],
            [decay_masks[i] for i in reference_indices],
            None if grad_sums is None else [grad_sums[i] for i in reference_indices],
            grad_scale=grad_scale,
            found_inf=found_inf,
            **kwargs,
        )
        for i, buf in zip(reference_indices, sub_buffers, strict=True):
            momentum_buffers[i] = buf


def _kernel_step(
    indices,
    params,
    grads,
    momentum_buffers,
    keep_masks,
    decay_masks,
    grad_sums,
    *,
    first,
    lr,
    momentum,
    dampening,
    weight_decay,
    nesterov,
    maximize,
    grad_scale,
    found_inf,
) -> None:
    group_params = [params[i] for i in indices]
    device = group_params[0].device
    group_bufs: list[Tensor] = []
    if momentum != 0:
        for i in indices:
            if momentum_buffers[i] is None:
                # Zeros, not empty: a first step skipped for an overflow (found_inf) must
                # not leave uninitialised memory behind.
                init = torch.empty_like if found_inf is None else torch.zeros_like
                momentum_buffers[i] = init(params[i], memory_format=torch.contiguous_format)
            elif not momentum_buffers[i].is_contiguous():
                momentum_buffers[i] = momentum_buffers[i].contiguous()
            group_bufs.append(momentum_buffers[i])
    keeps = [keep_masks[i] for i in indices]
    decays = [decay_masks[i] for i in indices]
    torch.ops.recallprune.undecayed_sgd_(
        group_params,
        [grads[i].contiguous() for i in indices],
        group_bufs,
        keeps if any(m is not None for m in keeps) else [],
        decays if any(m is not None for m in decays) else [],
        [] if grad_sums is None else [grad_sums[i] for i in indices],
        lr=float(lr),
        momentum=float(momentum),
        dampening=float(dampening),
        weight_decay=float(weight_decay),
        nesterov=nesterov,
        maximize=maximize,
        is_first_step=first,
        grad_scale=None if grad_scale is None else _as_float_scalar(grad_scale, device),
        found_inf=None if found_inf is None else _as_float_scalar(found_inf, device),
    )


def _as_float_scalar(value: Tensor, device: torch.device) -> Tensor:
    # Non-blocking only towards a GPU: the CPU kernel reads the value at once.
    return value.to(device=device, dtype=torch.float32, non_blocking=device.type != "cpu").reshape(
        1
    )
