"""ConfusionCounter: per-class confusion counts accumulated on the device, with no host
synchronisation per batch, and the recall, accuracy and support derived from them."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import ops

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _as_batch(input: Tensor, target: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Check shapes and dtypes (no sync) and view the batch as ``[N, C, S]`` / ``[N, S]``."""
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError(
            f"input and target must be tensors, got {type(input).__name__} and "
            f"{type(target).__name__}"
        )
    if target.dtype not in _LABEL_DTYPES:
        raise TypeError(f"target must hold integer class labels, got dtype {target.dtype}")
    if input.device != target.device:
        raise ValueError(f"input is on {input.device} but target is on {target.device}")
    if input.is_floating_point():
        if input.dtype not in _LOGIT_DTYPES:
            raise TypeError(
                f"logits must be float32, float16, bfloat16 or float64, got {input.dtype}"
            )
        if input.dim() < 2 or input.shape[1] != num_classes:
            raise ValueError(
                f"logits must have shape [N, C, ...] with C = num_classes = {num_classes}, "
                f"got {tuple(input.shape)}"
            )
        expected = input.shape[:1] + input.shape[2:]
        if target.shape != expected:
            raise ValueError(
                f"target must have shape {tuple(expected)} for logits of shape "
                f"{tuple(input.shape)}, got {tuple(target.shape)}"
            )
        n, inner = input.shape[0], math.prod(input.shape[2:])
        return input.reshape(n, num_classes, inner), target.reshape(n, inner)
    if input.dtype not in _LABEL_DTYPES:
        raise TypeError(
            f"input must be float logits [N, C, ...] or integer labels [N, ...], got {input.dtype}"
        )
    if input.shape != target.shape:
        raise ValueError(
            f"predicted labels and target must have the same shape, got {tuple(input.shape)} "
            f"and {tuple(target.shape)}"
        )
    n = input.shape[0] if input.dim() > 0 else 1
    inner = math.prod(input.shape[1:])
    return input.reshape(n, inner), target.reshape(n, inner)


def _check_options(num_classes: int, ignore_index: int | None, backend: str) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if ignore_index is not None and (
        isinstance(ignore_index, bool) or not isinstance(ignore_index, int)
    ):
        raise TypeError(f"ignore_index must be an int or None, got {ignore_index!r}")
    ops.check_backend(backend)


def _update(
    counts: Tensor,
    invalid: Tensor,
    input: Tensor,
    target: Tensor,
    num_classes: int,
    ignore_index: int | None,
    backend: str,
) -> None:
    input, target = _as_batch(input, target, num_classes)
    if input.device != counts.device:
        raise ValueError(
            f"the batch is on {input.device} but the counter is on {counts.device}; create the "
            f"counter with device={str(input.device)!r} or move the batch"
        )
    ops.confusion_update_(counts, invalid, input, target, num_classes, ignore_index, backend)


def _raise_if_invalid(invalid: Tensor, num_classes: int, ignore_index: int | None) -> None:
    bad = int(invalid.sum())  # the one host sync, at compute time
    if bad:
        allowed = f"[0, {num_classes})" + (
            f" or ignore_index={ignore_index}" if ignore_index is not None else ""
        )
        raise ValueError(
            f"{bad} target or predicted label(s) were outside {allowed} and were not counted; "
            "the valid entries are counted as usual. Fix the labels (or set ignore_index), "
            "then call reset()"
        )


class ConfusionCounter:
    """Confusion counts accumulated on the device: ``counts[true, predicted]``, int64.

    ``update(input, target)`` takes logits ``[N, C]`` (fp32, fp16 or bf16; the prediction is
    ``argmax``, first index on ties, NaN as ``torch.argmax`` treats it), or predicted labels
    ``[N]``, with integer targets ``[N]``; also ``[N, C, ...]`` logits with ``[N, ...]``
    targets, flattened. It never synchronises with the host: labels outside ``[0, C)`` (other
    than ``ignore_index``) are counted on the device and make the next ``compute()`` raise.

    Args:
        num_classes: C.
        device: where the counts live (the batches must be there too). Default: CPU.
        ignore_index: a target label to skip (e.g. a segmentation "void" label).
        backend: ``"auto"`` (the compiled kernel when present), ``"kernel"`` or ``"reference"``.
    """

    def __init__(
        self,
        num_classes: int,
        device: torch.device | str | None = None,
        ignore_index: int | None = None,
        backend: str = "auto",
    ) -> None:
        _check_options(num_classes, ignore_index, backend)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.backend = backend
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._counts = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=self.device)
        self._invalid = torch.zeros(1, dtype=torch.int64, device=self.device)

    def update(self, input: Tensor, target: Tensor) -> None:
        """Count one batch (no host synchronisation)."""
        _update(
            self._counts,
            self._invalid,
            input,
            target,
            self.num_classes,
            self.ignore_index,
            self.backend,
        )

    def compute(self) -> Tensor:
        """The counts, int64 ``[C, C]`` (rows: true class; columns: predicted class).

        Raises ValueError if any invalid label was seen since the last ``reset()``.
        """
        _raise_if_invalid(self._invalid, self.num_classes, self.ignore_index)
        return self._counts.view(self.num_classes, self.num_classes).clone()

    @property
    def invalid_count(self) -> Tensor:
        """How many entries were invalid since the last reset (a device tensor, no sync)."""
        return self._invalid[0].clone()

    def support(self) -> Tensor:
        """Entries per true class, int64 ``[C]``."""
        return self.compute().sum(dim=1)

    def recall(self) -> Tensor:
        """Per-class recall, float64 ``[C]``; NaN for a class with no support."""
        counts = self.compute()
        support = counts.sum(dim=1)
        return counts.diagonal().double() / support.double()

    def accuracy(self) -> Tensor:
        """Trace over the total of counted entries, float64 scalar (NaN when empty)."""
        counts = self.compute()
        return counts.trace().double() / counts.sum().double()

    def reset(self) -> None:
        """Zero the counts and the invalid-entry counter."""
        self._counts.zero_()
        self._invalid.zero_()

    def sync(self) -> None:
        """All-reduce (SUM) the counts over ``torch.distributed`` ranks; no-op otherwise."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        both = torch.cat([self._counts, self._invalid])
        torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.SUM)
        self._counts.copy_(both[:-1])
        self._invalid.copy_(both[-1:])

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "counts": self._counts.view(self.num_classes, self.num_classes).clone(),
            "invalid": self._invalid.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_classes") != self.num_classes:
            raise ValueError(
                f"the state holds counts for {state.get('num_classes')} classes, this counter "
                f"has {self.num_classes}"
            )
        counts = state["counts"]
        if counts.shape != (self.num_classes, self.num_classes) or counts.dtype != torch.int64:
            raise ValueError(
                f"state['counts'] must be int64 of shape {(self.num_classes, self.num_classes)}, "
                f"got {counts.dtype} of shape {tuple(counts.shape)}"
            )
        self.ignore_index = state.get("ignore_index", self.ignore_index)
        self._counts.copy_(counts.reshape(-1))
        self._invalid.copy_(state["invalid"].reshape(1))

    def __repr__(self) -> str:
        return (
            f"ConfusionCounter(num_classes={self.num_classes}, device={self.device}, "
            f"ignore_index={self.ignore_index})"
        )


def confusion_matrix(
    input: Tensor,
    target: Tensor,
    num_classes: int,
    ignore_index: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """Confusion counts of one batch, int64 ``[C, C]``; see :class:`ConfusionCounter`.

    Runs the functional op (:func:`recallprune.ops.confusion_matrix`) with the kernels where
    they are available. Raises ValueError if any label is outside ``[0, C)`` (this check
    synchronises).
    """
    _check_options(num_classes, ignore_index, backend)
    counts, invalid = ops.confusion_matrix(
        *_as_batch(input, target, num_classes), num_classes, ignore_index, backend
    )
    _raise_if_invalid(invalid, num_classes, ignore_index)
    return counts
