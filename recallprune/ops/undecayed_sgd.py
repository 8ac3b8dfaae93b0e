"""The fused UndecayedSGD op, ``torch.ops.recallprune.undecayed_sgd_`` and its ``tensor``
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
_SCALAR_TENSOR_DTYPES = (torch.float32, torch.float64)


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
    """Whether the op updates ``param`` with ``grad``: dense, non-overlapping weights
    (contiguous, channels_last or any other dense layout; updated in place) of a kernel dtype
    and dense gradients of the weights' dtype and device (copied to the weights' layout where
    they are not in it). Anything else goes to the reference."""
    return (
        param.layout == torch.strided
        and param.dtype in KERNEL_DTYPES
        and is_dense(param)
        and not grad.is_sparse
        and grad.dtype == param.dtype
        and grad.device == param.device
    )


def is_dense(tensor: Tensor) -> bool:
    """Whether ``tensor``'s elements fill a block of memory without gaps or overlaps (a
    permutation of a contiguous tensor): the kernels walk such a tensor as a flat array."""
    if tensor.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted(
        (st, n) for n, st in zip(tensor.shape, tensor.stride(), strict=True) if n != 1
    ):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(param: Tensor, tensor: Tensor) -> bool:
    """Whether ``tensor`` (of ``param``'s shape) lays its elements out in memory as the dense
    ``param`` does, so that the kernels walk both as flat arrays in step."""
    return tensor.layout == torch.strided and all(
        n == 1 or a == b
        for n, a, b in zip(param.shape, param.stride(), tensor.stride(), strict=True)
    )


def in_layout_of(
    param: Tensor, tensor: Tensor, dtype: torch.dtype | None = None, *, copy: bool = False
) -> Tensor:
    """``tensor`` (of ``param``'s shape), on ``param``'s device and in its memory layout:
    itself where it is already (unless ``copy``), else a copy (``dtype``: the copy's dtype,
    else the tensor's)."""
    dtype = tensor.dtype if dtype is None else dtype
    same = tensor.device == param.device and tensor.dtype == dtype
    if not copy and same and same_layout(param, tensor):
        return tensor
    return torch.empty_like(param, dtype=dtype).copy_(tensor)


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
    keep_masks_packed: bool = False,
) -> tuple[torch._ops.OpOverload, tuple, dict]:
    """The overload and arguments of one call of the op on ``params`` (all of one device):
    :func:`undecayed_sgd_` runs it, the tests hand it to ``torch.library.opcheck``.

    A tensor ``lr`` or ``weight_decay`` selects the ``tensor`` overload, which reads a
    tensor on the parameters' GPU there, as torch's fused SGD reads its lr (no host
    synchronisation), and one on the CPU on the host; no value is read here. ``grad_scale``
    and ``found_inf`` go to the parameters' device as float32 ``[1]``.
    """
    device = params[0].device
    op = torch.ops.recallprune.undecayed_sgd_.default
    if isinstance(lr, Tensor) or isinstance(weight_decay, Tensor):
        op = torch.ops.recallprune.undecayed_sgd_.tensor
        lr, weight_decay = _scalar_tensor(lr, device), _scalar_tensor(weight_decay, device)
    else:
        lr, weight_decay = float(lr), float(weight_decay)
    args = (params, grads, momentum_buffers, keep_masks, decay_masks, grad_sums)
    kwargs = dict(
        lr=lr,
        momentum=float(momentum),
        dampening=float(dampening),
        weight_decay=weight_decay,
        nesterov=nesterov,
        maximize=maximize,
        is_first_step=is_first_step,
        grad_scale=None if grad_scale is None else _as_float_scalar(grad_scale, device),
        found_inf=None if found_inf is None else _as_float_scalar(found_inf, device),
        keep_masks_packed=keep_masks_packed,
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
    keep_masks_packed: bool = False,
) -> None:
    """One fused UndecayedSGD step over ``params`` (one device; at least one tensor), in place.

    The lists are the op's: ``momentum_buffers`` empty when ``momentum == 0``, else one
    contiguous buffer per parameter (filled from the gradient when ``is_first_step``);
    ``keep_masks`` / ``decay_masks`` empty or one bool/uint8 mask or ``None`` per parameter;
    ``grad_sums`` empty or one sum per parameter (float32, float64 for float64 weights).
    ``keep_masks_packed`` (the CPU kernel only): the keep masks are :func:`pack_keep_mask`'s
    bits, one per element. Every parameter must pass :func:`kernel_takes`.
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
        keep_masks_packed=keep_masks_packed,
    )
    op(*args, **kwargs)


def pack_keep_mask(param: Tensor, mask: Tensor) -> Tensor:
    """``mask`` (bool, in ``param``'s memory layout) as the CPU kernel's packed keep mask:
    uint8 ``[ceil(numel / 8)]``, bit ``e % 8`` of byte ``e // 8`` for element ``e`` in memory
    order. A pruned step reads an eighth of a byte per weight instead of a byte."""
    numel = mask.numel()
    # The dense mask's elements in memory order (its layout is the weight's).
    flat = mask.as_strided((numel,), (1,), mask.storage_offset()).to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, -numel % 8)).view(-1, 8)
    weights = 2 ** torch.arange(8, device=mask.device)
    return (flat * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def _scalar_tensor(value: float | Tensor, device: torch.device) -> Tensor:
    """A hyper-parameter for the ``tensor`` overload: a float as a float64 CPU tensor (read
    on the host, exactly), a tensor where it is when that is the CPU or the parameters'
    device, as float32 or float64."""
    if not isinstance(value, Tensor):
        return torch.tensor(float(value), dtype=torch.float64)
    if value.device.type != "cpu" and value.device != device:
        value = value.to(device, non_blocking=True)
    if value.dtype not in _SCALAR_TENSOR_DTYPES:
        value = value.to(torch.float64)  # exact for every float dtype narrower than float64
    return value


def _as_float_scalar(value: Tensor, device: torch.device) -> Tensor:
    # Non-blocking only towards a GPU: the CPU kernel reads the value at once.
    non_blocking = device.type != "cpu"
    return value.to(device=device, dtype=torch.float32, non_blocking=non_blocking).reshape(1)


@register_fakes
def _register_fakes() -> None:
    # Both overloads only update their inputs in place: their fake kernels do nothing.
    for name in ("recallprune::undecayed_sgd_", "recallprune::undecayed_sgd_.tensor"):
        torch.library.register_fake(name)(_updates_in_place)


def _updates_in_place(*args, **kwargs) -> None:
    return None
