"""ConfusionCounter: per-class confusion counts accumulated on the device, with no host
synchronisation per batch, and the recall, accuracy and support derived from them."""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path, PurePosixPath
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


_CGROUP_ROOT = Path("/sys/fs/cgroup")
_CGROUP_MEMBERSHIP = Path("/proc/self/cgroup")


@functools.cache
def _cgroup_memory_limit(
    root: Path = _CGROUP_ROOT, membership: Path = _CGROUP_MEMBERSHIP
) -> int | None:
    """The memory limit of this process's control group in bytes (cgroup v2 ``memory.max``,
    v1 ``memory.limit_in_bytes``; the tightest of the group's and its parents'), or None
    where there is none or none can be read. A container's own view of the hierarchy is its
    group's: the files at the root then hold its limit. Read once per process (about 0.1 ms,
    most of what building a counter would otherwise cost)."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, group = rest.partition(":")
        if hierarchy == "0" and not controllers:
            base, name = root, "memory.max"
        elif "memory" in controllers.split(","):
            base, name = root / "memory", "memory.limit_in_bytes"
        else:
            continue
        parts = PurePosixPath(group).parts[1:]
        for depth in range(len(parts), -1, -1):
            try:
                text = base.joinpath(*parts[:depth], name).read_text().strip()
            except OSError:
                continue
            if text.isdigit() and int(text) < 2**60:  # "max", or v1's "unlimited" near 2**63
                limits.append(int(text))
    return min(limits) if limits else None


def _device_memory(device: torch.device) -> int | None:
    """The memory of ``device`` in bytes: for the CPU, physical memory or the process's
    control-group limit, whichever is less; the GPU's for CUDA; ``None`` where unknown
    (``meta`` holds no data)."""
    if device.type == "cpu":
        try:
            physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            physical = None
        known = [m for m in (physical, _cgroup_memory_limit()) if m is not None]
        return min(known) if known else None
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory
    return None


def _check_size(num_classes: int, device: torch.device, models: int = 1) -> None:
    """Refuse a matrix (``models`` of them) that ``device`` could not hold, before allocating.

    The limit is half the device's memory: ``compute()``, ``state_dict()`` and ``sync()``
    each make a copy of the counts beside them.
    """
    needed = models * num_classes * num_classes * 8
    memory = _device_memory(device)
    if memory is not None and 2 * needed > memory:
        matrices = f"{models} " if models > 1 else "a "
        raise ValueError(
            f"ConfusionCounter: num_classes={num_classes} needs {matrices}{num_classes} x "
            f"{num_classes} int64 matri{'ces' if models > 1 else 'x'} of {_gigabytes(needed)} "
            f"({needed:,} bytes), twice that with the copy "
            f"that compute() and sync() make, but {device} has {_gigabytes(memory)} of memory "
            "in all. Count fewer classes (group the rare ones), or count on a device with more "
            "memory"
        )


def _gigabytes(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def recall_and_accuracy(counts: Tensor) -> tuple[Tensor, Tensor]:
    """Per-class recall ``[..., C]`` (NaN for a class with no support) and accuracy ``[...]``
    (NaN when empty), float64, from confusion counts ``[..., C, C]`` on any device."""
    correct = counts.diagonal(dim1=-2, dim2=-1)
    recall = correct.double() / counts.sum(dim=-1).double()
    accuracy = correct.sum(dim=-1).double() / counts.sum(dim=(-2, -1)).double()
    return recall, accuracy


class _Counts:
    """What ConfusionCounter and StackedConfusionCounter share: counts ``[*lead, C * C]`` and
    invalid entries ``[*lead, 1]`` on the device (``lead`` is ``()`` for one model, ``(B,)``
    for a stack), what is derived from them, the all-reduce over ranks and the state.

    The counts since the last ``sync()`` on this process are kept apart from those summed
    over the ranks by the syncs so far (``_reduced``, ``[*lead, C * C + 1]`` with the invalid
    entries last; None before the first sync): that keeps ``sync()`` idempotent.
    """

    num_classes: int
    ignore_index: int | None
    device: torch.device
    _lead: tuple[int, ...]

    def _allocate(self) -> None:
        cells = self.num_classes * self.num_classes
        self._counts = torch.zeros(*self._lead, cells, dtype=torch.int64, device=self.device)
        self._invalid = torch.zeros(*self._lead, 1, dtype=torch.int64, device=self.device)
        self._reduced: Tensor | None = None

    def _models(self) -> int:
        return math.prod(self._lead)

    def _totals(self) -> tuple[Tensor, Tensor]:
        """The counts and invalid entries: summed over the ranks so far, plus this
        process's since the last sync. The local tensors themselves before any sync."""
        if self._reduced is None:
            return self._counts, self._invalid
        return self._reduced[..., :-1] + self._counts, self._reduced[..., -1:] + self._invalid

    def compute(self) -> Tensor:
        """The counts, int64 ``[*lead, C, C]`` (rows: true class; columns: predicted class).

        Raises ValueError if any invalid label was seen since the last ``reset()``.
        """
        counts, invalid = self._totals()
        _raise_if_invalid(invalid, self.num_classes, self.ignore_index)
        if counts is self._counts:
            counts = counts.clone()
        return counts.view(*self._lead, self.num_classes, self.num_classes)

    @property
    def invalid_count(self) -> Tensor:
        """How many entries were invalid since the last reset (a device tensor, no sync)."""
        return self._totals()[1][..., 0].clone()

    def support(self) -> Tensor:
        """Entries per true class, int64 ``[*lead, C]``."""
        return self.compute().sum(dim=-1)

    def recall(self) -> Tensor:
        """Per-class recall, float64 ``[*lead, C]``; NaN for a class with no support."""
        return recall_and_accuracy(self.compute())[0]

    def accuracy(self) -> Tensor:
        """Trace over the total of counted entries, float64 ``[*lead]`` (NaN when empty)."""
        return recall_and_accuracy(self.compute())[1]

    def reset(self) -> None:
        """Zero the counts and the invalid-entry counter."""
        self._counts.zero_()
        self._invalid.zero_()
        self._reduced = None

    def sync(self) -> None:
        """All-reduce (SUM) the counts over ``torch.distributed`` ranks; no-op otherwise.

        Every rank must call it (it is a collective). Idempotent: it sums what this process
        counted since its last sync, so a second call without new updates changes nothing,
        and updates after a sync are summed by the next one.
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        pending = torch.cat([self._counts, self._invalid], dim=-1)
        torch.distributed.all_reduce(pending, op=torch.distributed.ReduceOp.SUM)
        if self._reduced is None:
            self._reduced = pending
        else:
            self._reduced.add_(pending)
        self._counts.zero_()
        self._invalid.zero_()

    def to(self, device: torch.device | str | int):
        """Move the counts to ``device``; returns the counter itself, as ``nn.Module.to``."""
        device = torch.device(device)
        _check_size(self.num_classes, device, self._models())
        self._counts = self._counts.to(device)
        self._invalid = self._invalid.to(device)
        if self._reduced is not None:
            self._reduced = self._reduced.to(device)
        self.device = device
        return self

    def _state_header(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index}

    def state_dict(self) -> dict[str, Any]:
        """``counts`` (``[*lead, C, C]``) and ``invalid`` (``[*lead, 1]``) as ``compute()``
        and ``invalid_count`` see them, and, after a ``sync()``, the part of them already
        summed over the ranks (``synced_counts``, ``synced_invalid``), so that a loaded
        counter syncs each count once too."""
        shape = (*self._lead, self.num_classes, self.num_classes)
        counts, invalid = self._totals()
        state = {**self._state_header(), "counts": counts.view(shape).clone()}
        state["invalid"] = invalid.clone()
        if self._reduced is not None:
            state["synced_counts"] = self._reduced[..., :-1].reshape(shape).clone()
            state["synced_invalid"] = self._reduced[..., -1:].clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise TypeError(
                f"load_state_dict takes the dict that state_dict() returns, got "
                f"{type(state).__name__}"
            )
        for key, what in (("num_models", "models"), ("num_classes", "classes")):
            mine = getattr(self, key, None)
            if state.get(key) != mine:
                raise ValueError(
                    f"the state holds counts for {state.get(key)} {what}, this counter has {mine}"
                )
        shape = (*self._lead, self.num_classes, self.num_classes)
        invalid_shape = (*self._lead, 1)
        for key, expected in (("counts", shape), ("invalid", invalid_shape)):
            self._check_state_tensor(state, key, expected)
        synced = "synced_counts" in state
        if synced:
            self._check_state_tensor(state, "synced_counts", shape)
            self._check_state_tensor(state, "synced_invalid", invalid_shape)
        self.ignore_index = state.get("ignore_index", self.ignore_index)
        cells = self.num_classes * self.num_classes
        counts = state["counts"].reshape(*self._lead, cells).to(self.device)
        invalid = state["invalid"].to(self.device)
        if synced:
            reduced = torch.cat(
                [state["synced_counts"].reshape(*self._lead, cells), state["synced_invalid"]],
                dim=-1,
            )
            self._reduced = reduced.to(self.device, copy=True)
            counts = counts - self._reduced[..., :-1]
            invalid = invalid - self._reduced[..., -1:]
        else:
            self._reduced = None
        self._counts.copy_(counts)
        self._invalid.copy_(invalid)

    @staticmethod
    def _check_state_tensor(state: dict[str, Any], key: str, shape: tuple[int, ...]) -> None:
        value = state.get(key)
        if not (isinstance(value, Tensor) and value.dtype == torch.int64 and value.shape == shape):
            got = (
                f"{value.dtype} of shape {tuple(value.shape)}"
                if isinstance(value, Tensor)
                else type(value).__name__
            )
            raise ValueError(f"state[{key!r}] must be int64 of shape {shape}, got {got}")


class ConfusionCounter(_Counts):
    """Confusion counts accumulated on the device: ``counts[true, predicted]``, int64.

    ``update(input, target)`` takes logits ``[N, C]`` (fp32, fp16 or bf16; the prediction is
    ``argmax``, first index on ties, NaN as ``torch.argmax`` treats it), or predicted labels
    ``[N]``, with integer targets ``[N]``; also ``[N, C, ...]`` logits with ``[N, ...]``
    targets, flattened. It never synchronises with the host: labels outside ``[0, C)`` (other
    than ``ignore_index``) are counted on the device and make the next ``compute()`` raise.

    Under ``torch.distributed``, ``sync()`` sums the counts over the ranks; it may be called
    any number of times (each count is summed once). ``to(device)`` moves the counts.

    Args:
        num_classes: C. A ``C x C`` matrix that would take more than half the device's memory
            is refused (``num_classes=100_000`` asks for 80 GB).
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
        _check_size(num_classes, self.device)
        self._lead = ()
        self._allocate()

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

    def __repr__(self) -> str:
        return (
            f"ConfusionCounter(num_classes={self.num_classes}, device={self.device}, "
            f"ignore_index={self.ignore_index})"
        )


class StackedConfusionCounter(_Counts):
    """The confusion counts of ``num_models`` models at once, e.g. stacked models evaluated
    together: ``counts[model, true, predicted]``, int64, with no host synchronisation per batch.

    ``update(input, target)`` takes each model's logits ``[B, N, C, ...]`` or predicted labels
    ``[B, N, ...]``, and the targets, shared by the models (``[N, ...]``) or each model's own
    (``[B, N, ...]``). Model ``b``'s counts are those a :class:`ConfusionCounter` would hold
    after ``update(input[b], target[b])``; labels are checked as it checks them, per model.
    ``compute()``, ``recall()``, ``accuracy()``, ``support()`` and ``invalid_count`` have a
    leading model dimension; ``sync()``, ``to()``, ``state_dict()`` and ``load_state_dict()``
    work as :class:`ConfusionCounter`'s, on every model's counts at once (the state's
    ``counts`` are ``[B, C, C]``, its ``invalid`` ``[B, 1]``).

    Args:
        num_models: B.
        num_classes: C.
        device, ignore_index, backend: as :class:`ConfusionCounter`'s.
    """

    def __init__(
        self,
        num_models: int,
        num_classes: int,
        device: torch.device | str | None = None,
        ignore_index: int | None = None,
        backend: str = "auto",
    ) -> None:
        if isinstance(num_models, bool) or not isinstance(num_models, int) or num_models < 1:
            raise ValueError(f"num_models must be a positive int, got {num_models!r}")
        _check_options(num_classes, ignore_index, backend)
        self.num_models = num_models
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.backend = backend
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        _check_size(num_classes, self.device, num_models)
        self._lead = (num_models,)
        self._allocate()

    def update(self, input: Tensor, target: Tensor) -> None:
        """Count one batch of every model (no host synchronisation)."""
        models = self.num_models
        if not isinstance(input, Tensor) or not isinstance(target, Tensor):
            raise TypeError(
                f"input and target must be tensors, got {type(input).__name__} and "
                f"{type(target).__name__}"
            )
        if input.dim() < 2 or input.shape[0] != models:
            raise ValueError(
                f"input must hold the {models} models' logits [B, N, C, ...] or labels "
                f"[B, N, ...] with B = {models}, got shape {tuple(input.shape)}"
            )
        shared = (
            target.shape == input.shape[1:]
            if not input.is_floating_point()
            else (target.shape == input.shape[1:2] + input.shape[3:])
        )
        if shared:
            target = target.unsqueeze(0).expand(models, *target.shape)
        elif target.dim() == 0 or target.shape[0] != models:
            raise ValueError(
                f"target must be shared by the models ([N, ...]) or each model's own "
                f"([B, N, ...] with B = {models}) for input of shape {tuple(input.shape)}, got "
                f"{tuple(target.shape)}"
            )
        # The per-model checks and views of ConfusionCounter, on the models side by side.
        batch, labels = _as_batch(input.flatten(0, 1), target.flatten(0, 1), self.num_classes)
        # Against the counts' device: "cuda" names the current GPU, the batch's is "cuda:0".
        if batch.device != self._counts.device:
            raise ValueError(
                f"the batch is on {batch.device} but the counter is on {self.device}; create "
                f"the counter with device={str(batch.device)!r} or move the batch"
            )
        ops.confusion_update_stacked_(
            self._counts,
            self._invalid.view(models),
            batch.view(models, -1, *batch.shape[1:]),
            labels.view(models, -1, labels.shape[1]),
            self.num_classes,
            self.ignore_index,
            self.backend,
        )

    def _state_header(self) -> dict[str, Any]:
        return {"num_models": self.num_models, **super()._state_header()}

    def __repr__(self) -> str:
        return (
            f"StackedConfusionCounter(num_models={self.num_models}, num_classes="
            f"{self.num_classes}, device={self.device}, ignore_index={self.ignore_index})"
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
