"""The study runner: dense models per seed, pruned descendants per criterion and round, a
control arm, evaluation with ConfusionCounter; every finished run saved atomically, so an
interrupted study resumes where it stopped."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._extras import study_imports
from ..distortion import recall_and_accuracy
from ..metrics import ConfusionCounter
from ..optim import UndecayedSGD, decay_param_groups
from ..pruning import Pruner
from .config import StudyConfig
from .datasets import Dataset, load_dataset
from .models import build_model, output_layer_name

with study_imports():
    from tqdm.auto import tqdm

log = logging.getLogger("recallprune.study")

CONTROL = "control"
DENSE = "dense"


class StudyError(Exception):
    """A problem with the study's input or output folder, said for people."""


# -- files ---------------------------------------------------------------------------------


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash leaves the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write(text)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)


def atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as tmp:
        torch.save(obj, tmp)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise StudyError(
            f"{what} {path} cannot be read ({error}); it is corrupt or truncated"
        ) from error


# -- distributed ---------------------------------------------------------------------------


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()


def setup_distributed(device: torch.device) -> Distributed:
    """Join the process group when started by torchrun (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend)
    return Distributed(torch.distributed.get_rank(), torch.distributed.get_world_size())


# -- training and evaluation ---------------------------------------------------------------


def phase_seed(*parts: Any) -> int:
    """A stable seed for one phase of the study (independent of what ran before)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def _batches(n: int, batch_size: int, generator: torch.Generator, dist: Distributed):
    """Shuffled index batches; under torchrun each rank takes its share of every batch."""
    order = torch.randperm(n, generator=generator)
    per_rank = max(1, batch_size // dist.world_size)
    step = per_rank * dist.world_size
    for start in range(0, n - dist.world_size + 1, step):
        batch = order[start : start + step]
        batch = batch[dist.rank :: dist.world_size]
        if len(batch):
            yield batch


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Dataset,
    epochs: int,
    config: StudyConfig,
    device: torch.device,
    dist: Distributed,
    generator: torch.Generator,
    scheduler: Any = None,
    on_epoch: Any = None,
    progress: bool = False,
) -> float:
    """Train for ``epochs`` epochs; returns the mean loss of the last epoch."""
    network = model
    if dist.active:
        network = nn.parallel.DistributedDataParallel(model)
    model.train()
    x, y = data.x_train, data.y_train
    loss_value = float("nan")
    for epoch in tqdm(range(epochs), desc="epochs", leave=False, disable=not progress):
        total, count = torch.zeros((), device=device), 0
        for batch in _batches(len(x), config.batch_size, generator, dist):
            inputs, targets = x[batch].to(device), y[batch].to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(network(inputs), targets)
            loss.backward()
            optimizer.step()
            total += loss.detach()
            count += 1
        if scheduler is not None:
            scheduler.step()
        loss_value = float(total) / max(count, 1)
        if on_epoch is not None:
            on_epoch(epoch + 1)
    return loss_value


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Dataset, device: torch.device, dist: Distributed
) -> torch.Tensor:
    """Confusion counts on the test set (summed over ranks), int64 ``[C, C]`` on the CPU."""
    model.eval()
    counter = ConfusionCounter(data.num_classes, device=device)
    indices = torch.arange(len(data.x_test))[dist.rank :: dist.world_size]
    for start in range(0, len(indices), 1024):
        batch = indices[start : start + 1024]
        counter.update(model(data.x_test[batch].to(device)), data.y_test[batch].to(device))
    counter.sync()
    return counter.compute().cpu()


def make_record(
    confusion: torch.Tensor,
    seed: int,
    criterion: str,
    round_index: int,
    nominal: float,
    sparsity: float,
    train_loss: float,
    seconds: float,
) -> dict[str, Any]:
    recall, accuracy = recall_and_accuracy(confusion)
    return {
        "seed": seed,
        "criterion": criterion,
        "round": round_index,
        "nominal_sparsity": nominal,
        "sparsity": sparsity,
        "accuracy": None if math.isnan(accuracy) else accuracy,
        "recall": [None if math.isnan(r) else float(r) for r in recall],
        "support": confusion.sum(dim=1).tolist(),
        "confusion": confusion.tolist(),
        "train_loss": train_loss,
        "seconds": round(seconds, 3),
    }


# -- the study -----------------------------------------------------------------------------


class Study:
    """One study in one output folder. ``run()`` does (or resumes) it and writes the report."""

    def __init__(self, config: StudyConfig, out: Path, progress: bool = True) -> None:
        config.validate()
        self.config = config
        self.out = Path(out)
        self.progress = progress
        self.device = torch.device(config.device)
        self.dist = setup_distributed(self.device)
        self.reused = 0
        self.computed = 0

    # files of the study
    def record_path(self, seed: int, arm: str, round_index: int) -> Path:
        return self.out / "runs" / f"seed{seed}-{arm}-r{round_index:02d}.json"

    def checkpoint_path(self, seed: int, arm: str, round_index: int) -> Path:
        return self.out / "checkpoints" / f"seed{seed}-{arm}-r{round_index:02d}.pt"

    def arms(self) -> list[str]:
        return [CONTROL, *self.config.criteria]

    def prepare_folder(self) -> None:
        """Create the folder, or check that it holds this very study (nothing is overwritten
        otherwise). Rank 0 decides; under torchrun the other ranks learn its verdict."""
        problem = None
        if self.dist.is_main:
            try:
                self._check_folder()
                self.out.mkdir(parents=True, exist_ok=True)
                text = json.dumps(self.config.to_dict(), indent=2) + "\n"
                atomic_write_text(self.out / "config.json", text)
            except StudyError as error:
                problem = str(error)
        if self.dist.active:
            verdict = [problem]
            torch.distributed.broadcast_object_list(verdict, src=0)
            problem = verdict[0]
        if problem is not None:
            raise StudyError(problem)

    def _check_folder(self) -> None:
        config_path = self.out / "config.json"
        if self.out.exists() and not self.out.is_dir():
            raise StudyError(f"--out {self.out} exists and is not a folder")
        if config_path.exists():
            saved = read_json(config_path, "the study's config")
            mine = self.config.identity()
            theirs = {k: v for k, v in saved.items() if k in mine}
            differing = sorted(k for k in mine if theirs.get(k) != mine[k])
            if differing:
                raise StudyError(
                    f"output folder {self.out} holds another study (its config differs in "
                    f"{', '.join(differing)}); choose another --out, or rerun with its settings "
                    "to resume it. Nothing was overwritten."
                )
            results = self.out / "results.json"
            if results.exists():
                read_json(results, "results file")  # a corrupt file is an error, not a restart
        elif self.out.exists() and any(self.out.iterdir()):
            raise StudyError(
                f"output folder {self.out} is not empty and holds no study (no config.json); "
                "choose another --out. Nothing was overwritten."
            )

    def load_record(self, path: Path) -> dict[str, Any] | None:
        if not path.exists():
            return None
        return read_json(path, "run record")

    def save(
        self,
        record: dict[str, Any],
        path: Path,
        checkpoint: dict | None = None,
        checkpoint_path: Path | None = None,
    ) -> None:
        if self.dist.is_main:
            if checkpoint is not None:
                atomic_save(checkpoint, checkpoint_path)
            atomic_write_text(path, json.dumps(record) + "\n")
        self.dist.barrier()

    def run(self) -> list[dict[str, Any]]:
        config = self.config
        self.prepare_folder()
        data = load_dataset(
            config.dataset,
            data_root=config.data_root,
            download=config.download,
            difficulty=config.difficulty,
            imbalance=config.imbalance,
        )
        log.info("dataset: %s", data.description)
        records: list[dict[str, Any]] = []
        total = len(config.seeds) * (1 + len(self.arms()) * config.rounds)
        bar = tqdm(total=total, desc="runs", disable=not self.progress or not self.dist.is_main)
        try:
            for seed in config.seeds:
                records.append(self.dense(seed, data, bar))
                for arm in self.arms():
                    records.extend(self.arm(seed, arm, data, bar))
        finally:
            bar.close()
        log.info(
            "%d runs: %d reused from %s, %d computed", total, self.reused, self.out, self.computed
        )
        return records

    def _new_model(self, seed: int, data: Dataset) -> nn.Module:
        torch.manual_seed(phase_seed(seed, "init"))
        return build_model(self.config.model, data.input_shape, data.num_classes).to(self.device)

    def _optimizer(self, model: nn.Module, lr: float) -> UndecayedSGD:
        config = self.config
        return UndecayedSGD(
            decay_param_groups(model, config.weight_decay), lr=lr, momentum=config.momentum
        )

    def dense(self, seed: int, data: Dataset, bar) -> dict[str, Any]:
        config = self.config
        path = self.record_path(seed, DENSE, 0)
        record = self.load_record(path)
        if record is not None and self.checkpoint_path(seed, DENSE, 0).exists():
            self.reused += 1
            bar.update()
            return record
        start = time.perf_counter()
        model = self._new_model(seed, data)
        optimizer = self._optimizer(model, config.lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs)
        generator = torch.Generator().manual_seed(phase_seed(seed, DENSE))
        rewind_state: dict[str, torch.Tensor] = {}

        def snapshot(epoch: int) -> None:
            if epoch == config.rewind_epoch:
                rewind_state.update({k: v.detach().clone() for k, v in model.state_dict().items()})

        if config.retrain == "rewind" and config.rewind_epoch == 0:
            snapshot(0)
        loss = train(
            model,
            optimizer,
            data,
            config.epochs,
            config,
            self.device,
            self.dist,
            generator,
            scheduler,
            snapshot,
            self.progress and self.dist.is_main,
        )
        confusion = evaluate(model, data, self.device, self.dist)
        record = make_record(confusion, seed, DENSE, 0, 0.0, 0.0, loss, time.perf_counter() - start)
        checkpoint = {"model": _cpu_state(model.state_dict()), "masks": {}, "rewind": rewind_state}
        self.save(record, path, checkpoint, self.checkpoint_path(seed, DENSE, 0))
        self.computed += 1
        bar.update()
        log.info("seed %d dense: accuracy %.4f", seed, record["accuracy"])
        return record

    def arm(self, seed: int, arm: str, data: Dataset, bar) -> list[dict[str, Any]]:
        """The rounds of one criterion (or the control) for one seed; resumes after the last
        round whose record and checkpoint are on disk."""
        config = self.config
        records, last = [], 0
        for round_index in range(1, config.rounds + 1):
            record = self.load_record(self.record_path(seed, arm, round_index))
            if record is None:
                break
            records.append(record)
            last = round_index
        while last > 0 and not self.checkpoint_path(seed, arm, last).exists():
            last -= 1  # a record without its checkpoint cannot be continued from
            records.pop()
        self.reused += len(records)
        bar.update(len(records))
        if last == config.rounds:
            return records

        model = self._new_model(seed, data)
        dense = torch.load(self.checkpoint_path(seed, DENSE, 0), weights_only=True)
        state = (
            dense
            if last == 0
            else torch.load(self.checkpoint_path(seed, arm, last), weights_only=True)
        )
        model.load_state_dict(state["model"])
        exclude = config.exclude if config.exclude is not None else [output_layer_name(model)]
        masks = {k: v.to(self.device) for k, v in state["masks"].items()}
        for round_index in range(last + 1, config.rounds + 1):
            start = time.perf_counter()
            lr = config.lr if config.retrain == "rewind" else config.finetune_lr
            optimizer = self._optimizer(model, lr)
            criterion = "magnitude" if arm == CONTROL else arm
            pruner = Pruner(
                model,
                criterion,
                scope=config.scope,
                exclude=exclude,
                optimizer=optimizer,
                seed=phase_seed(seed, arm, round_index),
            )
            if masks:
                pruner.masks.update(masks)
                pruner.apply()
            if arm != CONTROL:
                generator = torch.Generator().manual_seed(
                    phase_seed(seed, arm, round_index, "score")
                )
                order = torch.randperm(len(data.x_train), generator=generator)
                batches = [
                    (data.x_train[idx], data.y_train[idx])
                    for idx in order.split(config.batch_size)[: config.n_batches]
                ]
                pruner.prune(config.fraction, data=batches, n_batches=config.n_batches)
            if config.retrain == "rewind":
                model.load_state_dict(dense["rewind"])
                pruner.apply()
            generator = torch.Generator().manual_seed(phase_seed(seed, arm, round_index, "train"))
            loss = train(
                model,
                optimizer,
                data,
                config.finetune_epochs,
                config,
                self.device,
                self.dist,
                generator,
            )
            confusion = evaluate(model, data, self.device, self.dist)
            masks = {k: v.clone() for k, v in pruner.masks.items()}
            record = make_record(
                confusion,
                seed,
                arm,
                round_index,
                config.nominal_sparsity(round_index),
                pruner.sparsity(),
                loss,
                time.perf_counter() - start,
            )
            checkpoint = {
                "model": _cpu_state(model.state_dict()),
                "masks": {k: v.cpu() for k, v in masks.items()},
            }
            self.save(
                record,
                self.record_path(seed, arm, round_index),
                checkpoint,
                self.checkpoint_path(seed, arm, round_index),
            )
            if self.dist.is_main and round_index > 1:
                self.checkpoint_path(seed, arm, round_index - 1).unlink(missing_ok=True)
            self.computed += 1
            bar.update()
            records.append(record)
            log.debug(
                "seed %d %s round %d: sparsity %.4f accuracy %.4f",
                seed,
                arm,
                round_index,
                record["sparsity"],
                record["accuracy"],
            )
        return records


def _cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}
