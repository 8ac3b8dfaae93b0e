"""The study itself: a dense model per seed, then per criterion (and a control arm that prunes
nothing) the rounds of an :class:`~recallprune.pruning.Iterative` schedule, each model
evaluated with ConfusionCounter. Every finished run is saved as it completes, so that an
interrupted study resumes where it stopped."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._extras import study_imports
from ..mitigation import NONE, Multipliers
from ..pruning import Iterative, Pruner
from .config import StudyConfig, parse_arm, split_arm
from .datasets import Dataset, load_dataset, subsample_train
from .distributed import setup_distributed
from .files import StudyError, load_checkpoint
from .folder import StudyFolder
from .models import build_model, output_layer_name
from .records import CONTROL, DENSE, make_record
from .training import (
    dense_reference,
    evaluate,
    grad_averages,
    last_epoch_average,
    make_optimizer,
    phase_seed,
    resolve_device,
    scoring_batches,
    train,
)

with study_imports():
    from tqdm.auto import tqdm

log = logging.getLogger("recallprune.study")

# Models up to this many parameters are tried on the CPU before a study starts (see check).
_CPU_CHECK_PARAMS = 1 << 22

__all__ = ["CONTROL", "DENSE", "Study", "StudyError"]


def parse_shard(text: str) -> tuple[int, int]:
    """``--shard i/n`` as ``(i, n)``, 1 <= i <= n."""
    index, _, count = str(text).partition("/")
    try:
        shard = int(index), int(count)
    except ValueError:
        shard = None
    if shard is None or not 1 <= shard[0] <= shard[1]:
        raise ValueError(f"--shard must be I/N with 1 <= I <= N (e.g. 1/4), got {text!r}")
    return shard


def shard_seeds(seeds: list[int], shard: tuple[int, int] | None) -> list[int]:
    """The seeds of one shard: every n-th seed, from the i-th (all of them without a shard)."""
    if shard is None:
        return list(seeds)
    index, count = shard
    mine = list(seeds[index - 1 :: count])
    if not mine:
        raise ValueError(
            f"--shard {index}/{count} has no seeds: the study has {len(seeds)} "
            f"seed(s); use at most {len(seeds)} shards"
        )
    return mine


class Study:
    """One study in one output folder. ``run()`` checks it, does (or resumes) it and returns
    its records; ``started`` says whether the folder has been claimed for it."""

    def __init__(
        self,
        config: StudyConfig,
        out: Path,
        progress: bool = True,
        shard: tuple[int, int] | None = None,
    ) -> None:
        config.validate()
        self.config = config
        self.shard = shard
        self.seeds = shard_seeds(config.seeds, shard)
        self.progress = progress
        self.device = resolve_device(config.device)
        self.dist = setup_distributed(self.device)
        self.folder = StudyFolder(Path(out), self.dist)
        self.model_info: dict[str, Any] | None = None  # set by check()
        self.started = False
        self.reused = 0
        self.computed = 0
        self._references: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def out(self) -> Path:
        return self.folder.path

    def arms(self) -> list[str]:
        return [CONTROL, *self.config.arms()]

    @staticmethod
    def base(arm: str) -> str:
        """The arm without its mitigation. A mitigated arm draws its pruning seed, scoring
        batches and data order from the base arm's, so that it differs from it only by the
        mitigation."""
        return arm if arm == CONTROL else split_arm(arm)[0]

    @staticmethod
    def mitigation(arm: str) -> str:
        return NONE if arm == CONTROL else split_arm(arm)[1]

    def schedule(self) -> Iterative:
        config = self.config
        return Iterative(config.rounds, config.fraction, config.retrain)

    def run(self) -> list[dict[str, Any]]:
        config = self.config
        data = self.check()
        self.folder.prepare(config.to_dict(), config.identity())
        self.started = True
        total = len(self.seeds) * (1 + len(self.arms()) * config.rounds)
        bar = tqdm(total=total, desc="runs", disable=not self.progress or not self.dist.is_main)
        try:
            records = self.grid(data, bar)
        finally:
            bar.close()
        log.info(
            "%d runs: %d reused from %s, %d computed", total, self.reused, self.out, self.computed
        )
        return records

    def grid_order(self, seeds: list[int] | None = None) -> list[tuple[int, str, int]]:
        """The runs of the grid as (seed, arm, round), in the order of ``results.json``: per
        seed its dense model, then each arm's rounds."""
        order = []
        for seed in self.seeds if seeds is None else seeds:
            order.append((seed, DENSE, 0))
            for arm in self.arms():
                order += [(seed, arm, r) for r in range(1, self.config.rounds + 1)]
        return order

    def saved_records(self) -> tuple[list[dict[str, Any]], int]:
        """The records of the whole grid (every shard's seeds) found in the folder, in the
        order of :meth:`grid_order`, and how many runs have none yet."""
        records, missing = [], 0
        for key in self.grid_order(self.config.seeds):
            record = self.folder.load_record(self.folder.record_path(*key))
            if record is None:
                missing += 1
            else:
                records.append(record)
        return records, missing

    def grid(self, data: Dataset, bar) -> list[dict[str, Any]]:
        """Every run of the grid, one model at a time: per seed its dense model, then each
        arm's rounds. Returns the records in that order."""
        records: list[dict[str, Any]] = []
        for seed in self.seeds:
            records.append(self.dense(seed, data, bar))
            for arm in self.arms():
                records.extend(self.arm(seed, arm, data, bar))
        return records

    # -- before anything is written ---------------------------------------------------------

    def check(self) -> Dataset:
        """Everything that can fail before training, tried before the output folder is
        touched: the dataset loads, the model builds for it and takes its inputs, the
        optimizer accepts the settings, and every arm's pruner its scope and --exclude.
        Returns the dataset."""
        config = self.config
        data = load_dataset(
            config.dataset,
            data_root=config.data_root,
            download=config.download,
            difficulty=config.difficulty,
            imbalance=config.imbalance,
        )
        data = subsample_train(data, config.train_fraction)
        log.info("dataset: %s", data.description)
        with torch.device("meta"):  # no memory, no random numbers drawn
            model = build_model(config.model, data.input_shape, data.num_classes, config.width)
        params = sum(p.numel() for p in model.parameters())
        self.model_info = {
            "name": config.model,
            "width": config.width,
            "params": params,
            "train_samples": len(data.y_train),
        }
        # A small model takes its trial batch on the CPU, its random numbers drawn from a
        # forked generator: the first forward pass on "meta" loads torch's decompositions,
        # which costs seconds that a small study notices.
        device = torch.device("cpu" if params <= _CPU_CHECK_PARAMS else "meta")
        with torch.random.fork_rng(devices=[]), device:
            if device.type == "cpu":
                model = build_model(config.model, data.input_shape, data.num_classes, config.width)
            try:
                logits = model(torch.zeros(2, *data.input_shape))
            except (RuntimeError, ValueError, NotImplementedError) as error:
                raise ValueError(
                    f"model {config.model!r} cannot take {config.dataset}'s inputs of shape "
                    f"{list(data.input_shape)}: {error}"
                ) from None
        if tuple(logits.shape) != (2, data.num_classes):
            raise ValueError(
                f"model {config.model!r} gives outputs of shape {list(logits.shape[1:])} for "
                f"{data.num_classes} classes"
            )
        for lr in (config.lr, self.retrain_lr()):
            try:
                optimizer = make_optimizer(model, lr, config.momentum, config.weight_decay)
            except ValueError as error:
                raise ValueError(
                    f"optimizer settings (lr {lr}, momentum {config.momentum}, weight decay "
                    f"{config.weight_decay}): {error}"
                ) from None
        for arm in self.arms():
            self.pruner(model, arm, optimizer, seed=0)
        return data

    # -- the pieces of a run ----------------------------------------------------------------

    def retrain_lr(self) -> float:
        """Rewound models train afresh at the dense learning rate; fine-tuning uses its own."""
        config = self.config
        return config.lr if config.retrain == "rewind" else config.finetune_lr

    def new_model(self, seed: int, data: Dataset) -> nn.Module:
        torch.manual_seed(phase_seed(seed, "init"))
        config = self.config
        model = build_model(config.model, data.input_shape, data.num_classes, config.width)
        return model.to(self.device)

    def scoring_batches(
        self, seed: int, arm: str, round_index: int, data: Dataset
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The training batches whose gradient a gradient criterion scores round
        ``round_index`` of ``arm`` with, drawn from that round's own generator."""
        config = self.config
        estimate = self.estimate(arm)
        if estimate == "full":
            n_batches = math.ceil(len(data.y_train) / config.batch_size)
        else:
            n_batches = estimate if isinstance(estimate, int) else config.n_batches
        base = self.base(arm)
        generator = torch.Generator().manual_seed(phase_seed(seed, base, round_index, "score"))
        return scoring_batches(data, config.batch_size, n_batches, generator)

    def optimizer(
        self, model: nn.Module, lr: float, track_grad_avg: bool = False
    ) -> torch.optim.Optimizer:
        config = self.config
        return make_optimizer(model, lr, config.momentum, config.weight_decay, track_grad_avg)

    def estimate(self, arm: str) -> int | str | None:
        """How ``arm`` estimates its gradient: a number of batches, ``"full"`` or
        ``"average"`` (see :func:`~recallprune.study.config.parse_arm`); None for ``n_batches``
        batches, or no gradient."""
        return None if arm == CONTROL else parse_arm(arm)[1]

    def tracks_average(self, arms: list[str]) -> bool:
        """Whether the training before a round of these arms tracks the gradient average."""
        return any(self.estimate(arm) == "average" for arm in arms)

    def average_gradients(
        self, average: dict[str, torch.Tensor] | None, pruner: Pruner, where: str
    ) -> dict[str, torch.Tensor]:
        """The saved gradient average of the pruned weights, for an ``:average`` arm."""
        if not average:
            raise StudyError(f"{where} holds no gradient average to score with")
        return {name: average[name].to(pruner.params[name].device) for name in pruner.params}

    def pruner(
        self, model: nn.Module, arm: str, optimizer, seed: int, lam: float | None = None
    ) -> Pruner:
        """The pruner of one round of ``arm`` (the control's never prunes); UP's ``lam`` from
        ``optimizer``'s groups unless given."""
        config = self.config
        exclude = config.exclude if config.exclude is not None else [output_layer_name(model)]
        criterion = "magnitude" if arm == CONTROL else parse_arm(arm)[0]
        return Pruner(
            model,
            criterion,
            scope=config.scope,
            exclude=exclude,
            optimizer=optimizer,
            lam=lam,
            seed=seed,
        )

    def dense_state(self, seed: int) -> dict[str, torch.Tensor]:
        """The dense model's weights of ``seed``, from its checkpoint."""
        return load_checkpoint(self.folder.checkpoint_path(seed, DENSE, 0))["model"]

    def reference(self, seed: int, data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense model's training-set counts and per-class losses of ``seed`` (measured
        once per process), which the mitigations hold its pruned models to."""
        if seed not in self._references:
            model = self.new_model(seed, data)
            model.load_state_dict(self.dense_state(seed))
            self._references[seed] = dense_reference(model, data, self.device)
        return self._references[seed]

    def stacked_multipliers(
        self, cells: list[tuple[int, str]], data: Dataset, states: list[dict[str, Any]]
    ) -> Multipliers | None:
        """The multipliers of these (seed, arm) models, stacked (None when none of them is
        mitigated), starting from those their checkpoints of the round before hold."""
        kinds = [self.mitigation(arm) for _, arm in cells]
        if all(kind == NONE for kind in kinds):
            return None
        counts, losses, initial = [], [], []
        for (seed, _), kind, state in zip(cells, kinds, states, strict=True):
            reference = self.reference(seed, data)
            counts.append(reference[0])
            losses.append(reference[1])
            saved = state.get("multipliers") if kind != NONE else None  # None at round 1
            # Saved on the CPU; the references (and the stack) live on the training device.
            zeros = torch.zeros_like(reference[1])
            initial.append(zeros if saved is None else saved.to(zeros.device, zeros.dtype))
        return Multipliers(
            kinds,
            torch.stack(counts),
            torch.stack(losses),
            self.config.epsilon,
            self.config.multiplier_step,
            initial=torch.stack(initial).to(self.device),
        )

    def train(self, model, optimizer, data, epochs, generator, **kwargs) -> float:
        return train(
            model,
            optimizer,
            data,
            epochs,
            self.config.batch_size,
            self.device,
            self.dist,
            generator,
            **kwargs,
        )

    # -- the dense model --------------------------------------------------------------------

    def dense(self, seed: int, data: Dataset, bar) -> dict[str, Any]:
        """The dense model of ``seed`` (reused when its record and checkpoint are saved);
        when rewinding, its checkpoint holds the schedule's snapshot of an early epoch."""
        config = self.config
        path = self.folder.record_path(seed, DENSE, 0)
        checkpoint_path = self.folder.checkpoint_path(seed, DENSE, 0)
        record = self.folder.load_record(path)
        if record is not None and checkpoint_path.exists():
            self.reused += 1
            bar.update()
            return record
        start = time.perf_counter()
        model = self.new_model(seed, data)
        track = self.tracks_average(self.arms())
        optimizer = self.optimizer(model, config.lr, track_grad_avg=track)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs)
        generator = torch.Generator().manual_seed(phase_seed(seed, DENSE))
        schedule = self.schedule()
        restart_average = last_epoch_average(optimizer, config.epochs)

        def snapshot(epoch: int) -> None:
            if config.retrain == "rewind" and epoch == config.rewind_epoch:
                schedule.snapshot(model)
            if track:
                restart_average(epoch)

        snapshot(0)
        loss = self.train(
            model,
            optimizer,
            data,
            config.epochs,
            generator,
            scheduler=scheduler,
            on_epoch=snapshot,
            progress=self.progress and self.dist.is_main,
        )
        confusion = evaluate(model, data, self.device, self.dist)
        record = make_record(confusion, seed, DENSE, 0, 0.0, 0.0, loss, time.perf_counter() - start)
        checkpoint = {
            "model": _cpu_state(model.state_dict()),
            "masks": {},
            "rewind": schedule.state_dict()["snapshot"] or {},
            "grad_average": grad_averages(optimizer, dict(model.named_parameters()))
            if track
            else {},
        }
        self.folder.save(record, path, checkpoint, checkpoint_path)
        self.computed += 1
        bar.update()
        log.info("seed %d dense: accuracy %.4f", seed, record["accuracy"])
        return record

    # -- an arm: the rounds of one criterion, or of the control -----------------------------

    def arm(self, seed: int, arm: str, data: Dataset, bar) -> list[dict[str, Any]]:
        """The rounds of one criterion (or the control) for one seed; resumes after the last
        round whose record and checkpoint are on disk."""
        records = self.finished_rounds(seed, arm)
        self.reused += len(records)
        bar.update(len(records))
        last = len(records)
        if last == self.config.rounds:
            return records

        model = self.new_model(seed, data)
        dense = load_checkpoint(self.folder.checkpoint_path(seed, DENSE, 0))
        if last == 0:
            state = dense
        else:
            state = load_checkpoint(self.folder.checkpoint_path(seed, arm, last))
        model.load_state_dict(state["model"])
        masks = {k: v.to(self.device) for k, v in state["masks"].items()}
        average = state.get("grad_average")
        multipliers = state.get("multipliers") if last else None
        schedule = self.schedule()
        schedule.load_state_dict({"round": last, "snapshot": dense["rewind"] or None})
        while not schedule.done:
            record, masks, average, multipliers = self.round(
                seed, arm, data, model, masks, average, schedule, multipliers
            )
            self.computed += 1
            bar.update()
            records.append(record)
        return records

    def finished_rounds(self, seed: int, arm: str) -> list[dict[str, Any]]:
        """The records of the rounds already done, up to the last one that can be continued
        from (its checkpoint is there)."""
        records = []
        for round_index in range(1, self.config.rounds + 1):
            record = self.folder.load_record(self.folder.record_path(seed, arm, round_index))
            if record is None:
                break
            records.append(record)
        while records and not self.folder.checkpoint_path(seed, arm, len(records)).exists():
            records.pop()  # a record without its checkpoint cannot be continued from
        return records

    def round(
        self,
        seed: int,
        arm: str,
        data: Dataset,
        model: nn.Module,
        masks: dict[str, torch.Tensor],
        average: dict[str, torch.Tensor] | None,
        schedule: Iterative,
        multipliers: torch.Tensor | None = None,
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor], Any]:
        """The next round of ``schedule``: prune (or not, in the control arm), retrain,
        evaluate and save. ``average``: the gradient average of the training before, for an
        ``:average`` arm; ``multipliers``: those the round before ended with, for a mitigated
        arm (they carry from round to round, as the constraint does). Returns the record, and
        the masks, gradient average and multipliers the next round starts from."""
        config = self.config
        round_index = schedule.round + 1
        start = time.perf_counter()
        track = self.estimate(arm) == "average"
        base = self.base(arm)
        optimizer = self.optimizer(model, self.retrain_lr(), track_grad_avg=track)
        pruner = self.pruner(model, arm, optimizer, seed=phase_seed(seed, base, round_index))
        if masks:
            pruner.masks.update(masks)
            pruner.apply()
        if arm == CONTROL:
            schedule.control_round(pruner)
        elif track:
            where = f"the checkpoint before round {round_index} of seed {seed}, {arm}"
            schedule.prune_round(pruner, gradients=self.average_gradients(average, pruner, where))
        else:
            batches = self.scoring_batches(seed, arm, round_index, data)
            schedule.prune_round(pruner, data=batches, n_batches=len(batches))
        generator = torch.Generator().manual_seed(phase_seed(seed, base, round_index, "train"))
        mitigation = self.mitigation(arm)
        state = None
        if mitigation != NONE:
            counts, losses = self.reference(seed, data)
            state = Multipliers(
                mitigation,
                counts,
                losses,
                config.epsilon,
                config.multiplier_step,
                initial=None if multipliers is None else multipliers.to(self.device),
            )
        loss = self.train(
            model,
            optimizer,
            data,
            config.finetune_epochs,
            generator,
            on_epoch=last_epoch_average(optimizer, config.finetune_epochs) if track else None,
            multipliers=state,
        )
        confusion = evaluate(model, data, self.device, self.dist)
        masks = {k: v.clone() for k, v in pruner.masks.items()}
        record = make_record(
            confusion,
            seed,
            arm,
            round_index,
            schedule.sparsity_after(round_index),
            pruner.sparsity(),
            loss,
            time.perf_counter() - start,
            multipliers=None if state is None else state.history,
            violations=None if state is None else state.violations,
        )
        average = grad_averages(optimizer, dict(model.named_parameters())) if track else {}
        multipliers = None if state is None else state.value.cpu()
        checkpoint = {
            "model": _cpu_state(model.state_dict()),
            "masks": {k: v.cpu() for k, v in masks.items()},
            "grad_average": average,
        }
        if multipliers is not None:  # carried to the next round
            checkpoint["multipliers"] = multipliers
        self.folder.save(
            record,
            self.folder.record_path(seed, arm, round_index),
            checkpoint,
            self.folder.checkpoint_path(seed, arm, round_index),
        )
        if round_index > 1:
            self.folder.drop_checkpoint(self.folder.checkpoint_path(seed, arm, round_index - 1))
        log.debug(
            "seed %d %s round %d: sparsity %.4f accuracy %.4f",
            seed,
            arm,
            round_index,
            record["sparsity"],
            record["accuracy"],
        )
        return record, masks, average, multipliers


def _cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}
