"""Pure-torch implementations of recallprune's kernels: the fallback and the test oracle.

Each function here is the one definition of its math; the C++ and CUDA kernels
mirror it and the tests compare them with it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def undecayed_sgd_reference(
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
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One UndecayedSGD step, tensor by tensor.

    Without masks, gradient sums and AMP scaling this is the op sequence of
    ``torch.optim.SGD(foreach=False)``, so the results are bit-identical to it.
    ``momentum_buffers`` entries that are ``None`` are created (first step) in place.
    Pruned elements (``keep_masks`` false) of the weights and momentum are set to
    exactly zero; their gradient sums are left as they are. Sparse (COO) gradients are
    taken as ``torch.optim.SGD`` takes them (no weight decay), with masks too.

    No value is read on the host (the step never synchronises with a GPU): a tensor ``lr``
    or ``weight_decay`` on the GPU is used there (then a zero ``weight_decay`` still adds
    ``0 * w``), and with ``found_inf`` the step is computed and kept only where
    ``found_inf`` is zero, as the kernels do. The one exception is a sparse gradient with
    ``found_inf``, whose momentum cannot be selected so: ``found_inf`` is read then.
    AMP (``grad_scale``): gradients are unscaled in float32 for float16/bfloat16 weights,
    the kernels' arithmetic, so that a small scaled gradient does not flush to zero.
    """
    # One-element tensors of any shape, as torch.optim.SGD takes them.
    lr, weight_decay, grad_scale = map(_as_0dim, (lr, weight_decay, grad_scale))
    skip = None
    if found_inf is not None:
        found_inf = found_inf.reshape(())
        if any(grad.is_sparse for grad in grads):
            if bool(found_inf):
                _skipped_step(params, momentum_buffers, momentum)
                return
        else:
            skip = found_inf != 0
    for i, param in enumerate(params):
        old_buf = momentum_buffers[i] if momentum != 0 else None
        grad_sum = None if grad_sums is None else grad_sums[i]
        # With found_inf: the step, then the old values back where it says the step overflowed.
        kept = [] if skip is None else [t for t in (param, old_buf, grad_sum) if t is not None]
        saved = [t.clone() for t in kept]
        buf = _step_one(
            param,
            grads[i],
            old_buf,
            keep_masks[i],
            decay_masks[i],
            grad_sum,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            grad_scale=grad_scale,
        )
        for new, old in zip(kept, saved, strict=True):
            new.copy_(torch.where(skip, old, new))
        if momentum != 0 and old_buf is None:
            if skip is not None:
                buf.masked_fill_(skip, 0)  # a skipped first step leaves zeros, as the kernels do
            momentum_buffers[i] = buf


def _skipped_step(params, momentum_buffers, momentum) -> None:
    # Like the kernels, a skipped first step leaves zero-filled momentum behind.
    if momentum != 0:
        for i, buf in enumerate(momentum_buffers):
            if buf is None:
                momentum_buffers[i] = torch.zeros_like(params[i])


def _step_one(
    param: Tensor,
    grad: Tensor,
    buf: Tensor | None,
    keep: Tensor | None,
    decay: Tensor | None,
    grad_sum: Tensor | None,
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float | Tensor,
    nesterov: bool,
    maximize: bool,
    grad_scale: Tensor | None,
) -> Tensor | None:
    """The step of one tensor, in place; returns its momentum buffer (new on the first step)."""
    if grad_scale is not None:
        if param.dtype in (torch.float16, torch.bfloat16):
            grad = grad.float()
        grad = grad / grad_scale
    if keep is not None and grad.is_sparse:
        # Sparse tensors have neither where nor masked_fill_: the pruned entries leave the
        # gradient here, so that nothing below adds them (to sums or sparse momentum).
        grad = where_kept(keep, grad)
    if grad_sum is not None:
        masked = keep is None or grad.is_sparse
        grad_sum.add_(grad if masked else torch.where(keep, grad, 0))
    grad = grad if not maximize else -grad
    if isinstance(weight_decay, Tensor) or weight_decay != 0:
        if _on_device(weight_decay):
            decayed = torch.addcmul(grad, param, weight_decay)
        else:
            decayed = grad.add(param, alpha=weight_decay)
        grad = decayed if decay is None else torch.where(decay, decayed, grad)
    if momentum != 0:
        if buf is None:
            buf = grad.detach().to(param.dtype, copy=True)
        else:
            buf.mul_(momentum).add_(grad, alpha=1 - dampening)
        if keep is not None and not buf.is_sparse:  # a sparse one has no pruned entries
            buf.masked_fill_(~keep, 0)
        grad = grad.add(buf, alpha=momentum) if nesterov else buf
    if _on_device(lr):
        param.addcmul_(grad, lr, value=-1)
    else:
        param.add_(grad, alpha=-lr)
    if keep is not None:
        param.masked_fill_(~keep, 0)
    return buf


def _as_0dim(value):
    return value.reshape(()) if isinstance(value, Tensor) else value


def _on_device(value: float | Tensor) -> bool:
    """Whether a hyper-parameter must be used as a tensor: on a GPU (reading it would
    synchronise) or part of the autograd graph. A CPU tensor is read by the op that takes
    it, as ``torch.optim.SGD`` reads it."""
    return isinstance(value, Tensor) and (value.requires_grad or value.device.type != "cpu")


def where_kept(keep: Tensor, values: Tensor) -> Tensor:
    """``torch.where(keep, values, 0)``, also for a sparse COO ``values`` (a new sparse tensor
    whose entries at pruned positions are zero, NaN there included)."""
    if not values.is_sparse:
        return torch.where(keep, values, 0)
    values = values.coalesce()
    indices = values.indices()
    kept = torch.where(keep[tuple(indices)], values.values(), 0)
    # The indices are those of a valid tensor: no need to check them again.
    return torch.sparse_coo_tensor(
        indices, kept, values.shape, is_coalesced=True, check_invariants=False
    )


def confusion_update_reference(
    counts: Tensor,
    invalid: Tensor,
    input: Tensor,
    target: Tensor,
    num_classes: int,
    ignore_index: int | None = None,
) -> None:
    """Add one batch to ``counts`` (int64 ``[C * C]``, row = true class) without a host sync.

    ``input``: logits ``[N, C, S]`` (prediction = ``argmax`` over dim 1: first index on ties,
    NaN counted as the largest value, as ``torch.argmax`` does) or labels ``[N, S]``;
    ``target``: labels ``[N, S]``. Entries whose target equals ``ignore_index`` are skipped;
    other entries whose target or predicted label lies outside ``[0, C)`` are counted in
    ``invalid`` (int64 ``[1]``) instead of ``counts``.
    """
    confusion_update_stacked_reference(
        counts.view(1, -1),
        invalid,
        input.unsqueeze(0),
        target.unsqueeze(0),
        num_classes,
        ignore_index,
    )


def confusion_update_stacked_reference(
    counts: Tensor,
    invalid: Tensor,
    input: Tensor,
    target: Tensor,
    num_classes: int,
    ignore_index: int | None = None,
) -> None:
    """:func:`confusion_update_reference` for ``B`` models at once: ``counts`` int64
    ``[B, C * C]``, ``invalid`` int64 ``[B]``, ``input`` logits ``[B, N, C, S]`` or labels
    ``[B, N, S]``, ``target`` labels ``[B, N, S]``; model ``b`` counts into row ``b``."""
    models = counts.shape[0]
    pred = input.argmax(dim=2) if input.is_floating_point() else input
    pred = pred.reshape(models, -1).to(torch.int64)
    target = target.reshape(models, -1).to(torch.int64)
    ok = (target >= 0) & (target < num_classes) & (pred >= 0) & (pred < num_classes)
    if ignore_index is not None:
        ignored = target == ignore_index
        bad = ~ok & ~ignored
        ok = ok & ~ignored
    else:
        bad = ~ok
    invalid.add_(bad.sum(dim=1))
    cells = num_classes * num_classes
    offsets = torch.arange(models, device=counts.device).unsqueeze(1) * cells
    bins = torch.where(ok, offsets + target * num_classes + pred, 0)
    counts.view(-1).index_add_(0, bins.reshape(-1), ok.reshape(-1).to(torch.int64))
