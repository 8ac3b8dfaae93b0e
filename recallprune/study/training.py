"""Training and evaluation of one model of the study: the device, seeded phases, shuffled
batches (shared out under torchrun), the training loop with UndecayedSGD, and the test-set
confusion counts from ConfusionCounter."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .._extras import study_imports
from ..metrics import ConfusionCounter
from ..mitigation import Multipliers, measure, sample_losses
from ..optim import UndecayedSGD, decay_param_groups
from .datasets import Dataset
from .distributed import Distributed

with study_imports():
    from tqdm.auto import tqdm

EVAL_BATCH = 1024


def resolve_device(name: str) -> torch.device:
    """The device named ``name``, checked to be usable here (before any file is written)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device {name!r} is not a device name: use cpu, cuda or cuda:N ({error})"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r}: CUDA is not available here (torch {torch.__version__}, "
                f"{'no GPU visible' if torch.version.cuda else 'a CPU-only build'}); use "
                "--device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    elif device.type != "cpu":
        try:
            torch.empty(1, device=device)
        except (RuntimeError, AssertionError) as error:
            raise ValueError(f"device {name!r} is not usable here: {error}") from None
    return device


def phase_seed(*parts: Any) -> int:
    """A stable seed for one phase of the study (independent of what ran before)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def make_optimizer(
    model: nn.Module,
    lr: float,
    momentum: float,
    weight_decay: float,
    track_grad_avg: bool = False,
) -> UndecayedSGD:
    """The study's optimizer: no weight decay on biases and normalisation parameters;
    ``track_grad_avg`` for the arms that score with the tracked gradient average."""
    groups = decay_param_groups(model, weight_decay)
    # Every group sets its own weight decay; the default is given so that SGD checks it.
    return UndecayedSGD(
        groups,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        track_grad_avg=track_grad_avg,
    )


def last_epoch_average(optimizer: UndecayedSGD, epochs: int) -> Callable[[int], None]:
    """An ``on_epoch`` callback that restarts the optimizer's gradient average before the
    last of ``epochs`` epochs, so that it holds that epoch's mean gradient."""

    def restart(epoch: int) -> None:
        if epoch == epochs - 1:
            optimizer.reset_grad_average()

    return restart


def grad_averages(
    optimizer: UndecayedSGD, named_parameters: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The tracked gradient average of every parameter, by name, on the CPU."""
    return {
        name: optimizer.grad_average(p).detach().cpu().clone()
        for name, p in named_parameters.items()
    }


def batches(
    n: int, batch_size: int, generator: torch.Generator, dist: Distributed
) -> Iterator[torch.Tensor]:
    """Shuffled index batches; under torchrun each rank takes its share of every batch."""
    order = torch.randperm(n, generator=generator)
    per_rank = max(1, batch_size // dist.world_size)
    step = per_rank * dist.world_size
    for start in range(0, n - dist.world_size + 1, step):
        batch = dist.share(order[start : start + step])
        if len(batch):
            yield batch


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Dataset,
    epochs: int,
    batch_size: int,
    device: torch.device,
    dist: Distributed,
    generator: torch.Generator,
    scheduler: Any = None,
    on_epoch: Callable[[int], None] | None = None,
    progress: bool = False,
    multipliers: Multipliers | None = None,
) -> float:
    """Train for ``epochs`` epochs; returns the mean loss of the last epoch. ``on_epoch(e)``
    is called after epoch ``e`` (1-based). With ``multipliers``, the model minimises their
    proxy Lagrangian, and they are updated after each epoch."""
    network = model
    if dist.active:
        network = nn.parallel.DistributedDataParallel(model)
    model.train()
    x, y = data.x_train, data.y_train
    loss_value = float("nan")
    for epoch in tqdm(range(epochs), desc="epochs", leave=False, disable=not progress):
        total, count = torch.zeros((), device=device), 0
        for batch in batches(len(x), batch_size, generator, dist):
            inputs, targets = x[batch].to(device), y[batch].to(device)
            optimizer.zero_grad(set_to_none=True)
            if multipliers is None:
                loss = nn.functional.cross_entropy(network(inputs), targets)
                loss.backward()
            else:
                logits = network(inputs)
                losses = sample_losses(logits, targets)
                multipliers.objective(logits, targets, losses).backward()
                loss = losses.mean()
            optimizer.step()
            total += loss.detach()
            count += 1
        if multipliers is not None:
            multipliers.sync()
            multipliers.end_epoch()
        if scheduler is not None:
            scheduler.step()
        loss_value = float(total) / max(count, 1)
        if on_epoch is not None:
            on_epoch(epoch + 1)
    return loss_value


def scoring_batches(
    data: Dataset, batch_size: int, n_batches: int, generator: torch.Generator
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The training batches whose gradient the gradient criteria score with."""
    order = torch.randperm(len(data.x_train), generator=generator)
    return [
        (data.x_train[indices], data.y_train[indices])
        for indices in order.split(batch_size)[:n_batches]
    ]


def dense_reference(
    model: nn.Module, data: Dataset, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense model's confusion counts ``[C, C]`` and mean loss per class ``[C]`` on the
    training set (eval mode), on ``device``: what the mitigations hold the pruned model to."""
    training = model.training
    model.eval()
    x, y = data.x_train, data.y_train
    chunks = [(x[i : i + EVAL_BATCH], y[i : i + EVAL_BATCH]) for i in range(0, len(y), EVAL_BATCH)]
    reference = measure(model, chunks, data.num_classes, device=device)
    model.train(training)
    return reference.counts(), reference.class_losses()


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Dataset, device: torch.device, dist: Distributed
) -> torch.Tensor:
    """Confusion counts on the test set (summed over ranks), int64 ``[C, C]`` on the CPU."""
    model.eval()
    counter = ConfusionCounter(data.num_classes, device=device)
    indices = dist.share(torch.arange(len(data.x_test)))
    for start in range(0, len(indices), EVAL_BATCH):
        batch = indices[start : start + EVAL_BATCH]
        counter.update(model(data.x_test[batch].to(device)), data.y_test[batch].to(device))
    counter.sync()
    return counter.compute().cpu()
