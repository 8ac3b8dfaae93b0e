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
    """
    if found_inf is not None and bool(found_inf.item()):
        # The fallback may synchronise here; the kernels read found_inf on the device.
        # Like the kernels, a skipped first step leaves zero-filled momentum behind.
        if momentum != 0:
            for i, buf in enumerate(momentum_buffers):
                if buf is None:
                    momentum_buffers[i] = torch.zeros_like(params[i])
        return
    if isinstance(lr, Tensor) and not lr.requires_grad:
        lr = lr.item()
    for i, param in enumerate(params):
        grad = grads[i]
        if grad_scale is not None:
            grad = grad / grad_scale
        keep = keep_masks[i]
        if keep is not None and grad.is_sparse:
            # Sparse tensors have neither where nor masked_fill_: the pruned entries leave the
            # gradient here, so that nothing below adds them (to sums or sparse momentum).
            grad = where_kept(keep, grad)
        if grad_sums is not None:
            masked = keep is None or grad.is_sparse
            grad_sums[i].add_(grad if masked else torch.where(keep, grad, 0))
        grad = grad if not maximize else -grad
        if weight_decay != 0:
            decayed = grad.add(param, alpha=weight_decay)
            decay = decay_masks[i]
            grad = decayed if decay is None else torch.where(decay, decayed, grad)
        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:
                buf = grad.detach().clone()
                momentum_buffers[i] = buf
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            if keep is not None and not buf.is_sparse:  # a sparse one has no pruned entries
                buf.masked_fill_(~keep, 0)
            grad = grad.add(buf, alpha=momentum) if nesterov else buf
        if isinstance(lr, Tensor):
            param.addcmul_(grad, lr, value=-1)
        else:
            param.add_(grad, alpha=-lr)
        if keep is not None:
            param.masked_fill_(~keep, 0)


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
