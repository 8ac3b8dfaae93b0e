"""Mitigations of recall distortion: fine-tuning a pruned model under per-class constraints
against its dense model, with one Lagrange multiplier per class.

Two constraints, each per class ``c``:

- ``constrained`` (Hashemizadeh et al., 2023): the excess accuracy drop
  ``(dense recall_c - recall_c) - (dense accuracy - accuracy) <= epsilon``;
- ``loss-gap`` (after Tran et al., 2022): ``loss_c - dense loss_c <= epsilon``, ``loss_c`` the
  class's mean cross-entropy.

Accuracy gaps are not differentiable, so the model minimises a proxy Lagrangian, the mean
loss plus ``sum_c lambda_c * (mean loss of class c)`` (scaled by ``1 / (1 + sum_c
lambda_c)``, see :func:`proxy_lagrangian`), while the multipliers rise by projected
gradient ascent on the measured violation once per epoch:
``lambda <- max(0, lambda + step * violation)``. The violation is measured on the training
set, from the confusion counts and per-class losses of the epoch just trained, accumulated
on the device. Everything here takes leading dimensions, so that stacked models (``[B, ...]``)
each keep their own multipliers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .metrics import ConfusionCounter, StackedConfusionCounter
from .metrics.confusion import recall_and_accuracy

NONE = "none"
MITIGATIONS = (NONE, "constrained", "loss-gap")
DEFAULT_EPSILON = 0.02
DEFAULT_STEP = 2.0

__all__ = [
    "DEFAULT_EPSILON",
    "DEFAULT_STEP",
    "MITIGATIONS",
    "ClassMeasurements",
    "ConstrainedFinetune",
    "Multipliers",
    "excess_accuracy_drop",
    "measure",
    "multiplier_step",
    "per_class_mean",
    "proxy_lagrangian",
]


def check_mitigation(mitigation: Any, what: str = "mitigation") -> str:
    if mitigation not in MITIGATIONS:
        raise ValueError(f"{what} must be one of {MITIGATIONS}, got {mitigation!r}")
    return mitigation


def multiplier_step(multipliers: Tensor, violation: Tensor, step: float) -> Tensor:
    """Projected gradient ascent: ``max(0, lambda + step * violation)``; a NaN violation (a
    class not seen) leaves its multiplier as it was."""
    violation = torch.nan_to_num(violation.to(multipliers.dtype), nan=0.0)
    return (multipliers + step * violation).clamp_min(0.0)


def per_class_mean(values: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """The mean of ``values`` per class over the last dimension, ``[..., C]`` (0 for a class
    absent from the batch)."""
    sums = values.new_zeros(*values.shape[:-1], num_classes).scatter_add(-1, targets, values)
    counts = values.new_zeros(*values.shape[:-1], num_classes)
    counts.scatter_add_(-1, targets, torch.ones_like(values))
    return sums / counts.clamp_min(1.0)


def sample_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """Each sample's cross-entropy: logits ``[..., b, C]``, targets ``[..., b]``."""
    return nn.functional.cross_entropy(
        logits.flatten(0, -2), targets.flatten(), reduction="none"
    ).view(targets.shape)


def proxy_lagrangian(losses: Tensor, targets: Tensor, multipliers: Tensor) -> Tensor:
    """The mean of the samples' ``losses`` plus ``sum_c multipliers_c * (mean loss of class
    c)``, divided by ``1 + sum_c multipliers_c``: ``losses``, ``targets`` ``[..., b]``,
    ``multipliers`` ``[..., C]``; returns ``[...]``. The division by a positive factor leaves
    the model's stationary points as they are, and keeps its effective step size from
    growing with the multipliers (which, unbounded, made fine-tuning diverge)."""
    multipliers = multipliers.to(losses.dtype)
    class_losses = per_class_mean(losses, targets, multipliers.shape[-1])
    lagrangian = losses.mean(dim=-1) + (multipliers * class_losses).sum(dim=-1)
    return lagrangian / (1.0 + multipliers.sum(dim=-1))


def excess_accuracy_drop(dense_counts: Any, counts: Any) -> Tensor:
    """Per class, ``(dense recall - recall) - (dense accuracy - accuracy)``: how much more the
    class lost than the model did, ``[..., C]`` float64 (NaN for a class without support)."""
    dense_recall, dense_accuracy = recall_and_accuracy(torch.as_tensor(dense_counts))
    recall, accuracy = recall_and_accuracy(torch.as_tensor(counts).to(dense_recall.device))
    return (dense_recall - recall) - (dense_accuracy - accuracy).unsqueeze(-1)


class ClassMeasurements:
    """The confusion counts and per-class summed losses of one pass over data, for one model
    (``models=None``) or a stack of ``models``, accumulated on the device with no host
    synchronisation per batch."""

    def __init__(self, num_classes: int, models: int | None = None, device=None) -> None:
        self.num_classes = num_classes
        self.models = models
        lead = () if models is None else (models,)
        if models is None:
            self.counter: Any = ConfusionCounter(num_classes, device=device)
        else:
            self.counter = StackedConfusionCounter(models, num_classes, device=device)
        # Summed losses and sample counts per class: [0] those of every rank up to the last
        # sync, [1] this rank's since then (so that a second sync adds nothing twice).
        self._sums = torch.zeros(2, 2, *lead, num_classes, dtype=torch.float64, device=device)

    def update(self, logits: Tensor, targets: Tensor, losses: Tensor) -> None:
        """One batch: ``logits`` ``[..., b, C]``, ``targets`` and ``losses`` ``[..., b]``."""
        logits, losses = logits.detach(), losses.detach().double()
        self.counter.update(logits, targets)
        self._sums[1, 0].scatter_add_(-1, targets, losses)
        self._sums[1, 1].scatter_add_(-1, targets, torch.ones_like(losses))

    def counts(self) -> Tensor:
        return self.counter.compute()

    def class_losses(self) -> Tensor:
        """Each class's mean loss, ``[..., C]`` (NaN for a class not seen)."""
        loss_sums, samples = self._sums.sum(dim=0)
        return loss_sums / samples

    def sync(self) -> None:
        """Sum the measurements over ``torch.distributed`` ranks; no-op otherwise, and for
        what an earlier sync summed already."""
        self.counter.sync()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self._sums[1])
            self._sums[0] += self._sums[1]
            self._sums[1].zero_()

    def reset(self) -> None:
        self.counter.reset()
        self._sums.zero_()


@torch.no_grad()
def measure(
    forward: Callable[[Tensor], Tensor],
    batches: Iterable[tuple[Tensor, Tensor]],
    num_classes: int,
    models: int | None = None,
    device=None,
) -> ClassMeasurements:
    """The measurements of ``forward`` (logits ``[..., b, C]`` of a batch's inputs) over
    ``(input, target)`` batches, targets shared by the stacked models."""
    measurements = ClassMeasurements(num_classes, models, device)
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        logits = forward(inputs)
        if models is not None:
            targets = targets.expand(models, *targets.shape)
        measurements.update(logits, targets, sample_losses(logits, targets))
    return measurements


class Multipliers:
    """Per-class Lagrange multipliers of one model, or of each model of a stack, with the
    dense reference they hold the pruned model to, the epoch's measurements and their
    history, one entry per epoch.

    Args:
        kinds: the mitigation (``"constrained"``, ``"loss-gap"`` or ``"none"``, whose
            multipliers stay 0), one for all models or one per model of a stack.
        dense_counts: the dense model's confusion counts on the training set ``[..., C, C]``
            (for ``constrained``).
        dense_losses: the dense model's mean loss per class on the training set ``[..., C]``
            (for ``loss-gap``).
        epsilon: the bound of the constraint.
        step: the multipliers' step size.
        initial: the multipliers to start from (default zeros), e.g. those of a round before.

    In each training step, ``objective(logits, targets, losses)`` counts the batch and
    returns the proxy Lagrangian; after each epoch, ``end_epoch()`` updates the multipliers.
    """

    def __init__(
        self,
        kinds: str | Sequence[str],
        dense_counts: Tensor,
        dense_losses: Tensor,
        epsilon: float = DEFAULT_EPSILON,
        step: float = DEFAULT_STEP,
        initial: Tensor | None = None,
    ) -> None:
        for name, value in (("epsilon", epsilon), ("step", step)):
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0 <= value < math.inf
            ):
                raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
        lead = tuple(dense_losses.shape[:-1])
        num_classes = dense_losses.shape[-1] if dense_losses.dim() else 0
        if dense_losses.dim() == 0 or tuple(dense_counts.shape) != (
            *lead,
            num_classes,
            num_classes,
        ):
            raise ValueError(
                "dense_losses must be [..., C] and dense_counts [..., C, C] with the same "
                f"leading dimensions, got {tuple(dense_losses.shape)} and "
                f"{tuple(dense_counts.shape)}"
            )
        names = [kinds] if isinstance(kinds, str) else list(kinds)
        for kind in names:
            check_mitigation(kind, "kinds")
        if not isinstance(kinds, str) and (len(lead) != 1 or len(names) != lead[0]):
            raise ValueError(
                f"kinds must be one mitigation or one per stacked model {lead}, got {names}"
            )
        device = dense_losses.device
        shape = (*lead, 1) if not isinstance(kinds, str) else (1,)
        self.constrained, self.loss_gap = (
            torch.tensor([k == kind for k in names], device=device).view(shape)
            for kind in MITIGATIONS[1:]
        )
        self.kinds = kinds
        self.dense_counts = dense_counts.to(device)
        self.dense_losses = dense_losses.double()
        self.epsilon = float(epsilon)
        self.step = float(step)
        self.value = torch.zeros(*lead, num_classes, dtype=torch.float64, device=device)
        if initial is not None:
            if not isinstance(initial, Tensor) or tuple(initial.shape) != self.value.shape:
                got = tuple(initial.shape) if isinstance(initial, Tensor) else type(initial)
                raise ValueError(
                    f"initial must be a tensor of the multipliers' shape "
                    f"{tuple(self.value.shape)}, got {got}"
                )
            # Once per round, before training: a host read here costs nothing per step (and a
            # meta tensor has no values to check).
            if not initial.is_meta and not bool(((initial >= 0) & initial.isfinite()).all()):
                raise ValueError("initial multipliers must be finite and non-negative")
            self.value.copy_(initial)
        self.measurements = ClassMeasurements(num_classes, lead[0] if lead else None, device)
        self.history: list[Tensor] = []  # the multipliers after each epoch's update
        self.violations: list[Tensor] = []  # the violation measured in each epoch

    def violation(self, measurements: ClassMeasurements) -> Tensor:
        """Each model's per-class violation of its constraint (0 without one), ``[..., C]``."""
        excess = excess_accuracy_drop(self.dense_counts, measurements.counts())
        gap = measurements.class_losses() - self.dense_losses
        violation = torch.where(
            self.constrained, excess.to(gap.device) - self.epsilon, torch.zeros_like(gap)
        )
        return torch.where(self.loss_gap, gap - self.epsilon, violation)

    def objective(self, logits: Tensor, targets: Tensor, losses: Tensor) -> Tensor:
        """Count the batch (no host synchronisation) and return each model's proxy
        Lagrangian, ``[...]``: ``losses`` are the samples' cross-entropies ``[..., b]``."""
        self.measurements.update(logits, targets, losses)
        return proxy_lagrangian(losses, targets, self.value)

    def sync(self) -> None:
        """Sum the epoch's measurements over ``torch.distributed`` ranks (data-parallel
        training), so that every rank takes the same step."""
        self.measurements.sync()

    def end_epoch(self) -> Tensor:
        """One step of the multipliers on the epoch's measured violation, then a fresh
        count for the next epoch; returns the violation."""
        violation = self.violation(self.measurements)
        self.value = multiplier_step(self.value, violation, self.step)
        self.history.append(self.value.detach().cpu().clone())
        self.violations.append(violation.detach().cpu().clone())
        self.measurements.reset()
        return violation


class ConstrainedFinetune:
    """Fine-tunes a (pruned) model with per-class multipliers against its dense reference.

    Args:
        model: the model to fine-tune (its optimizer keeps its pruned weights at zero).
        optimizer: any ``torch.optim.Optimizer`` over its parameters.
        loader: ``(input, target)`` batches of the training set, iterated once per epoch.
        num_classes: C.
        dense: the dense model, measured once on ``loader`` (or give ``dense_counts`` and
            ``dense_losses``, as :func:`measure` returns them).
        mitigation: ``"constrained"`` or ``"loss-gap"``.
        epsilon, step: the constraint's bound and the multipliers' step size.
        device: where the batches go (default: where the model's parameters are).

    ``fit(epochs)`` trains; ``multipliers`` (``[C]``), ``history`` (one ``[C]`` tensor per
    epoch) and ``violations`` say whether the constraint was active and met.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: Iterable[tuple[Tensor, Tensor]],
        num_classes: int,
        dense: nn.Module | None = None,
        *,
        mitigation: str = "constrained",
        epsilon: float = DEFAULT_EPSILON,
        step: float = DEFAULT_STEP,
        dense_counts: Tensor | None = None,
        dense_losses: Tensor | None = None,
        device=None,
    ) -> None:
        if check_mitigation(mitigation) == NONE:
            raise ValueError(f"mitigation must be one of {MITIGATIONS[1:]}, got 'none'")
        self.device = device or next(model.parameters()).device
        if dense is not None:
            training = dense.training
            dense.eval()
            reference = measure(dense, loader, num_classes, device=self.device)
            dense.train(training)
            dense_counts, dense_losses = reference.counts(), reference.class_losses()
        if dense_counts is None or dense_losses is None:
            raise ValueError("give the dense model, or both dense_counts and dense_losses")
        if dense_losses.dim() != 1 or dense_losses.shape[0] != num_classes:
            raise ValueError(
                f"dense_losses must be [num_classes] = [{num_classes}], got "
                f"{tuple(dense_losses.shape)}"
            )
        self.model, self.optimizer, self.loader = model, optimizer, loader
        self.num_classes = num_classes
        self.state = Multipliers(
            mitigation, dense_counts.to(self.device), dense_losses.to(self.device), epsilon, step
        )

    @property
    def multipliers(self) -> Tensor:
        return self.state.value

    @property
    def history(self) -> list[Tensor]:
        return self.state.history

    @property
    def violations(self) -> list[Tensor]:
        return self.state.violations

    def epoch(self) -> Tensor:
        """One epoch of the proxy Lagrangian, then the multipliers' update; returns the mean
        batch loss of the epoch (a device tensor)."""
        self.model.train()
        total, count = torch.zeros((), device=self.device), 0
        for inputs, targets in self.loader:
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            logits = self.model(inputs)
            losses = sample_losses(logits, targets)
            self.state.objective(logits, targets, losses).backward()
            self.optimizer.step()
            total += losses.detach().mean()
            count += 1
        self.state.sync()  # data-parallel: every rank steps its multipliers alike
        self.state.end_epoch()
        return total / max(count, 1)

    def fit(self, epochs: int) -> list[Tensor]:
        """``epochs`` epochs; returns the multipliers after each."""
        for _ in range(epochs):
            self.epoch()
        return self.history
