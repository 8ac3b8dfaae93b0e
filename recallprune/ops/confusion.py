"""The confusion-count ops, ``torch.ops.recallprune.confusion_update_`` (counts one batch into
given tensors) and ``torch.ops.recallprune.confusion_matrix`` (the counts of one batch): which
backend runs, the marshalling of the arguments and the fake kernels.

The math is :func:`recallprune.ops.reference.confusion_update_reference`. Both wrappers take
the op's layout: logits ``[N, C, S]`` or predicted labels ``[N, S]``, target labels
``[N, S]``; the user-facing shapes are :class:`recallprune.ConfusionCounter`'s concern.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .extension import register_fakes, resolve_backend
from .reference import confusion_update_reference, confusion_update_stacked_reference

_KERNEL_LABEL_DTYPES = (torch.int64, torch.int32)


def kernel_batch(input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``input`` and ``target`` as the kernels take them: contiguous, int32/int64 labels."""
    if not input.is_floating_point() and input.dtype not in _KERNEL_LABEL_DTYPES:
        input = input.to(torch.int64)
    if target.dtype not in _KERNEL_LABEL_DTYPES:
        target = target.to(torch.int64)
    return input.contiguous(), target.contiguous()


def confusion_update_(
    counts: Tensor,
    invalid: Tensor,
    input: Tensor,
    target: Tensor,
    num_classes: int,
    ignore_index: int | None = None,
    backend: str = "auto",
) -> None:
    """Add one batch to ``counts`` (int64 ``[C * C]``, row = true class) and count the entries
    with a label outside ``[0, C)`` (other than ``ignore_index``) in ``invalid`` (int64
    ``[1]``), on ``counts``' device with no host synchronisation."""
    if resolve_backend(backend, counts.device, "ConfusionCounter") == "kernel":
        input, target = kernel_batch(input, target)
        torch.ops.recallprune.confusion_update_(
            counts, invalid, input, target, num_classes, ignore_index
        )
    else:
        confusion_update_reference(counts, invalid, input, target, num_classes, ignore_index)


def confusion_update_stacked_(
    counts: Tensor,
    invalid: Tensor,
    input: Tensor,
    target: Tensor,
    num_classes: int,
    ignore_index: int | None = None,
    backend: str = "auto",
) -> None:
    """:func:`confusion_update_` for ``B`` models at once (the study's stacked models):
    ``counts`` int64 ``[B, C * C]``, ``invalid`` int64 ``[B]``, logits ``[B, N, C, S]`` or
    predicted labels ``[B, N, S]``, target labels ``[B, N, S]``."""
    if resolve_backend(backend, counts.device, "StackedConfusionCounter") == "kernel":
        input, target = kernel_batch(input, target)
        torch.ops.recallprune.confusion_update_stacked_(
            counts, invalid, input, target, num_classes, ignore_index
        )
    else:
        confusion_update_stacked_reference(
            counts, invalid, input, target, num_classes, ignore_index
        )


def confusion_matrix(
    input: Tensor,
    target: Tensor,
    num_classes: int,
    ignore_index: int | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """The counts of one batch, int64 ``[C, C]``, and the number of invalid entries, int64
    ``[1]`` (see :func:`confusion_update_`); a functional op, so it traces and compiles."""
    if resolve_backend(backend, input.device, "confusion_matrix") == "kernel":
        return torch.ops.recallprune.confusion_matrix(
            *kernel_batch(input, target), num_classes, ignore_index
        )
    counts = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=input.device)
    invalid = torch.zeros(1, dtype=torch.int64, device=input.device)
    confusion_update_reference(counts, invalid, input, target, num_classes, ignore_index)
    return counts.view(num_classes, num_classes), invalid


@register_fakes
def _register_fakes() -> None:
    @torch.library.register_fake("recallprune::confusion_update_")
    def _(counts, invalid, input, target, num_classes, ignore_index=None):
        return None  # counts into its inputs

    @torch.library.register_fake("recallprune::confusion_update_stacked_")
    def _(counts, invalid, input, target, num_classes, ignore_index=None):
        return None  # counts into its inputs

    @torch.library.register_fake("recallprune::confusion_matrix")
    def _(input, target, num_classes, ignore_index=None):
        counts = input.new_empty((num_classes, num_classes), dtype=torch.int64)
        return counts, input.new_empty((1,), dtype=torch.int64)
