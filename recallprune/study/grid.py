"""The study's grid trained as stacked models (``--execution batched``).

A study is a grid: seeds x arms (each criterion and the control) x rounds, every cell a small
model trained the same way. Sequentially, each training step of such a model is almost all
per-operation overhead. Here the dense models of all seeds train as one stacked model, and
then, round by round, every (seed, arm) model of that round trains as one stacked model
(:mod:`recallprune.study.stacked`), in stacks of at most ``max_stack`` models.

Each model keeps everything it has in the sequential study: its initialisation, its data
order (its own seeded generator, drawn exactly as the sequential loop draws it), its
pruning (its own :class:`~recallprune.pruning.Pruner`, criterion, scores and exact counts,
on a view of its slice of the stack, on the CPU, where a round's models are selected
together by :func:`~recallprune.pruning.prune_together`: the same masks as one by one), its
rewinding, and its records and checkpoints, saved per model as each stacked round finishes,
in the same files. So a batched study resumes a sequential one and the other way round, and
the two differ only by floating-point rounding (of batched matrix products; on a GPU, of
scores computed on the CPU). On a GPU the training steps replay a CUDA graph
(:mod:`recallprune.study.graphs`): the same kernels as the eager step.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..metrics import StackedConfusionCounter
from ..mitigation import NONE, Multipliers
from ..optim import UndecayedSGD, decay_param_groups
from ..pruning import prune_together
from ..pruning.criteria import CLASS_BALANCED, NEEDS_GRADIENT, class_balanced_weights
from .config import parse_arm
from .datasets import Dataset
from .graphs import CapturedStep
from .models import build_model
from .records import CONTROL, DENSE, make_record
from .runner import Study, _cpu_state
from .stacked import StackedMLP, StackedModel, stack_models, stack_states
from .training import EVAL_BATCH, grad_averages, last_epoch_average, phase_seed

log = logging.getLogger("recallprune.study")

# A round's linear layers go compact on the CPU where its pruned models keep less than this
# fraction of their weights: above it, the dense kernels are faster (benchmarks/
# bench_stacked_linear.py, bench_study.py).
COMPACT_BELOW = 0.6


def can_stack(model: nn.Module) -> bool:
    """Whether the study's batched path can stack this kind of model."""
    return stack_models([model]) is not None


def stacked_batches(n: int, batch_size: int, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Each model's shuffled order of the ``n`` training samples, drawn from its generator
    as the sequential loop draws it: ``[B, n]``."""
    return torch.stack([torch.randperm(n, generator=g) for g in generators])


def stacked_step(
    model: StackedModel,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batch: torch.Tensor,
    multipliers: Multipliers | None = None,
) -> torch.Tensor:
    """One training step of the stack on each model's own samples ``batch`` ``[B, b]`` (rows
    of ``x`` and ``y``): returns each model's mean batch loss, ``[B]``. The loss summed over
    models has, for each model, the gradient of that model's own mean batch loss (with
    ``multipliers``, of its own proxy Lagrangian)."""
    if multipliers is None and isinstance(model, StackedMLP) and model.fused_step(x):
        # The same gradients and step, bit for bit, from one call of the CPU kernels, without
        # autograd (the optimizer's step fused in, from its second step on).
        losses = model.step_fused(x, y, batch, optimizer)
        if losses is None:
            losses = model.step_grads(x, y, batch)
            optimizer.step()
        return losses.mean(dim=1)
    inputs, targets = x[batch], y[batch]
    optimizer.zero_grad(set_to_none=True)
    logits = model(inputs)  # [B, b, C]
    # Each sample's cross-entropy (sample_losses), the classes along dim 1: the stacked
    # models' logits are [B, C, b] in memory (samples last), so no copy.
    losses = nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    if multipliers is None:
        per_model = losses.mean(dim=1)
        per_model.sum().backward()
    else:
        multipliers.objective(logits, targets, losses).sum().backward()
        per_model = losses.mean(dim=1)
    optimizer.step()
    return per_model.detach()


def train_stacked(
    model: StackedModel,
    optimizer: torch.optim.Optimizer,
    data: Dataset,
    epochs: int,
    batch_size: int,
    device: torch.device,
    generators: Sequence[torch.Generator],
    scheduler: Any = None,
    on_epoch: Any = None,
    multipliers: Multipliers | None = None,
    graphs: bool | None = None,
) -> list[float]:
    """Train the stacked models for ``epochs`` epochs, each on its own batches; returns each
    model's mean loss over its last epoch (see :func:`stacked_step`; ``multipliers`` are
    updated after each epoch).

    ``graphs``: replay the full-size steps from a CUDA graph (:class:`~recallprune.study.
    graphs.CapturedStep`), the same kernels launched at once instead of one by one; default,
    on a CUDA device without ``multipliers`` (whose step reads values set between epochs)."""
    device = torch.device(device)
    if graphs is None:
        graphs = device.type == "cuda" and multipliers is None
    elif graphs and (device.type != "cuda" or multipliers is not None):
        raise ValueError(
            "train_stacked: graphs=True needs a CUDA device and no multipliers, got device "
            f"{device}" + (" and multipliers" if multipliers is not None else "")
        )
    model.train()
    x, y = data.x_train.to(device), data.y_train.to(device)
    n = len(x)

    def step(batch: torch.Tensor) -> torch.Tensor:
        return stacked_step(model, optimizer, x, y, batch, multipliers)

    full = (model.num_models, batch_size)
    captured = CapturedStep(step, optimizer, full, device) if graphs and n >= batch_size else None
    losses = torch.full((model.num_models,), float("nan"))
    for epoch in range(epochs):
        orders = stacked_batches(n, batch_size, generators).to(device)
        total = torch.zeros(model.num_models, device=device)
        count = 0
        for start in range(0, n, batch_size):
            batch = orders[:, start : start + batch_size]  # [B, b]
            if captured is not None and tuple(batch.shape) == full:
                total += captured(batch)
            else:
                total += step(batch)
            count += 1
        if multipliers is not None:
            multipliers.end_epoch()
        if scheduler is not None:
            scheduler.step()
        if on_epoch is not None:
            on_epoch(epoch + 1)
        if epoch == epochs - 1:  # read once, at the end: the host runs ahead of the device
            losses = (total / max(count, 1)).cpu()
    return losses.tolist()


@torch.no_grad()
def evaluate_stacked(
    model: StackedModel, data: Dataset, device: torch.device
) -> list[torch.Tensor]:
    """Each model's confusion counts on the test set, int64 ``[C, C]`` on the CPU: one
    forward pass of the stack and one stacked count per batch of test samples."""
    model.eval()
    counter = StackedConfusionCounter(model.num_models, data.num_classes, device=device)
    for start in range(0, len(data.x_test), EVAL_BATCH):
        inputs = data.x_test[start : start + EVAL_BATCH].to(device)
        targets = data.y_test[start : start + EVAL_BATCH].to(device)
        counter.update(model(inputs.unsqueeze(0).expand(model.num_models, *inputs.shape)), targets)
    return list(counter.compute().cpu())


def stacked_gradients(
    model: StackedModel,
    batches: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]] | None],
    device: torch.device,
    out: torch.device | str | None = None,
    balanced: Sequence[bool] | None = None,
) -> list[dict[str, torch.Tensor] | None]:
    """Each model's mean data-loss gradient over its own ``(input, target)`` batches, as
    :meth:`~recallprune.pruning.Pruner.gather_gradients` takes it from a single model (the
    mean over batches of each batch's mean cross-entropy, train mode), from one forward and
    backward pass of the stack per batch position; ``None`` where a model's entry is ``None``.
    Batches of unequal sizes are padded with samples of weight zero. The parameters'
    ``.grad`` fields are left as they were. ``out``: where the gradients are returned (one
    copy per stacked parameter); default, where the stack is. ``balanced``: per model, whether
    its loss is the class-balanced one (see :func:`~recallprune.pruning.criteria.
    class_balanced_weights`) rather than the batch mean."""
    wanted = [i for i, own in enumerate(batches) if own]
    if not wanted:
        return [None] * len(batches)
    parameters = dict(model.named_parameters())
    saved = {name: p.grad for name, p in parameters.items()}
    training = model.training
    try:
        for p in parameters.values():
            p.grad = None
        model.train()
        with torch.enable_grad():
            for j in range(max(len(batches[i]) for i in wanted)):
                present = [i for i in wanted if j < len(batches[i])]
                size = max(len(batches[i][j][1]) for i in present)
                first_x, first_y = batches[present[0]][j]
                x = first_x.new_zeros((model.num_models, size, *first_x.shape[1:]))
                y = first_y.new_zeros((model.num_models, size))
                weight = torch.zeros(model.num_models, size)
                for i in present:
                    inputs, targets = batches[i][j]
                    x[i, : len(targets)] = inputs
                    y[i, : len(targets)] = targets
                    if balanced is not None and balanced[i]:
                        sample = class_balanced_weights(targets).float()
                    else:
                        sample = torch.full((len(targets),), 1.0 / len(targets))
                    weight[i, : len(targets)] = sample / len(batches[i])
                logits = model(x.to(device))
                losses = nn.functional.cross_entropy(
                    logits.flatten(0, 1), y.to(device).flatten(), reduction="none"
                )
                (losses * weight.to(device).flatten()).sum().backward()
        grads = {
            name: p.grad.to(out) if out is not None else p.grad for name, p in parameters.items()
        }
        return [
            {name: grad[i].clone() for name, grad in grads.items()} if batches[i] else None
            for i in range(model.num_models)
        ]
    finally:
        for name, p in parameters.items():
            p.grad = saved[name]
        model.train(training)


def stacked_averages(
    optimizer: UndecayedSGD, stacked: StackedModel
) -> list[dict[str, torch.Tensor]]:
    """Each model's tracked gradient average, by the single model's parameter names (dense,
    0 at the weights a compact layer dropped: a masked optimizer's average there)."""
    averages = stacked.dense_named(grad_averages(optimizer, dict(stacked.named_parameters())))
    return [
        {name: average[i].clone() for name, average in averages.items()}
        for i in range(stacked.num_models)
    ]


def model_view(stacked: StackedModel, index: int, template: nn.Module) -> nn.Module:
    """``template`` with its parameters replaced by views of model ``index``'s slice of the
    stack: in-place changes to one show in the other (pruning, rewinding)."""
    for name, p in stacked.named_parameters():
        module_name, _, attribute = name.rpartition(".")
        owner = template.get_submodule(module_name) if module_name else template
        setattr(owner, attribute, nn.Parameter(p.data[index], requires_grad=True))
    return template


class BatchedStudy(Study):
    """:class:`Study` with its grid trained in stacks (see the module docstring).

    The checkpoints a round starts from are those the stage before has just saved: they are
    kept in memory (on the CPU, as saved) rather than read back, as long as a stage fits in
    one stack (at most ``max_stack`` models, so that memory stays bounded as the stacks
    bound it); the others, and those of a resumed study, are read from the folder."""

    def __init__(self, *args, max_stack: int = 64, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if max_stack < 1:
            raise ValueError(f"max_stack must be at least 1, got {max_stack}")
        self.max_stack = max_stack
        self._dense_held: dict[int, dict[str, Any]] = {}
        self._round_held: dict[tuple[int, str], dict[str, Any]] = {}
        self._finished: dict[tuple[int, str], list[dict[str, Any]]] | None = None

    def grid(self, data: Dataset, bar) -> list[dict[str, Any]]:
        """Every run of the grid, stage by stage in stacks; models that cannot be stacked,
        and data-parallel runs, go the sequential way (said once in the log)."""
        config = self.config
        reason = None
        if self.dist.active:
            reason = "data-parallel runs (torchrun) train one model at a time"
        elif not can_stack(self.new_model(self.seeds[0], data)):
            reason = f"model {config.model!r} cannot be stacked (only mlp and cnn can)"
        if reason is not None:
            log.info("execution: sequential, since %s", reason)
            return super().grid(data, bar)
        log.info("execution: batched, up to %d models per stack", self.max_stack)
        records: dict[tuple[int, str, int], dict[str, Any]] = {}
        self._finished = None
        try:
            # A stage's files are written while the next one trains.
            with self.folder.writing_behind():
                for record in self.dense_stage(data, bar):
                    records[(record["seed"], DENSE, 0)] = record
                for round_index in range(1, config.rounds + 1):
                    for record in self.round_stage(round_index, data, bar):
                        records[(record["seed"], record["criterion"], round_index)] = record
        finally:
            self._dense_held, self._round_held, self._finished = {}, {}, None
        return [records[key] for key in self.grid_order()]

    def _optimizer(
        self, stacked: StackedModel, lr: float, track_grad_avg: bool = False
    ) -> UndecayedSGD:
        config = self.config
        return UndecayedSGD(
            decay_param_groups(stacked, config.weight_decay),
            lr=lr,
            momentum=config.momentum,
            track_grad_avg=track_grad_avg,
        )

    def _chunks(self, items: list) -> list[list]:
        return [items[i : i + self.max_stack] for i in range(0, len(items), self.max_stack)]

    def _dense_checkpoint(self, seed: int) -> dict[str, Any]:
        """The dense checkpoint of ``seed``, read from the folder once where it is not held."""
        checkpoint = self._dense_held.get(seed)
        if checkpoint is None:
            checkpoint = self.folder.load_checkpoint(self.folder.checkpoint_path(seed, DENSE, 0))
            if len(self.seeds) <= self.max_stack:
                self._dense_held[seed] = checkpoint
        return checkpoint

    def _template(self, data: Dataset) -> nn.Module:
        """A single model of the study's kind and shape on the "meta" device: the structure
        that the stack and the views of its models take (no memory, no random numbers)."""
        config = self.config
        with torch.device("meta"):
            return build_model(config.model, data.input_shape, data.num_classes, config.width)

    # -- the dense models -----------------------------------------------------------------

    def dense_stage(self, data: Dataset, bar) -> list[dict[str, Any]]:
        out, todo = [], []
        for seed in self.seeds:
            path = self.folder.record_path(seed, DENSE, 0)
            record = self.folder.load_record(path)
            if record is not None and self.folder.checkpoint_path(seed, DENSE, 0).exists():
                self.reused += 1
                bar.update()
                out.append(record)
            else:
                todo.append(seed)
        for seeds in self._chunks(todo):
            out.extend(self._dense_stack(seeds, data, bar))
        return out

    def dense_state(self, seed: int) -> dict[str, torch.Tensor]:
        return self._dense_checkpoint(seed)["model"]

    def _dense_stack(self, seeds: list[int], data: Dataset, bar) -> list[dict[str, Any]]:
        config = self.config
        start = time.perf_counter()
        stacked = stack_models([self.new_model(seed, data) for seed in seeds]).to(self.device)
        track = self.tracks_average(self.arms())
        optimizer = self._optimizer(stacked, config.lr, track)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs)
        generators = [torch.Generator().manual_seed(phase_seed(s, DENSE)) for s in seeds]
        snapshots: list[dict[str, torch.Tensor]] = [{} for _ in seeds]
        restart_average = last_epoch_average(optimizer, config.epochs)

        def snapshot(epoch: int) -> None:
            if config.retrain == "rewind" and epoch == config.rewind_epoch:
                for i in range(len(seeds)):
                    snapshots[i] = stacked.model_state(i)
            if track:
                restart_average(epoch)

        snapshot(0)
        losses = train_stacked(
            stacked,
            optimizer,
            data,
            config.epochs,
            config.batch_size,
            self.device,
            generators,
            scheduler,
            snapshot,
        )
        confusions = evaluate_stacked(stacked, data, self.device)
        seconds = (time.perf_counter() - start) / len(seeds)
        averages = stacked_averages(optimizer, stacked) if track else [{} for _ in seeds]
        states = stacked.model_states()
        hold = len(self.seeds) <= self.max_stack
        self.folder.flush()  # the stage before's files (and their errors) first
        records = []
        for i, seed in enumerate(seeds):
            record = make_record(confusions[i], seed, DENSE, 0, 0.0, 0.0, losses[i], seconds)
            checkpoint = {
                "model": states[i],
                "masks": {},
                "rewind": _cpu_state(snapshots[i]) if snapshots[i] else {},
                "grad_average": averages[i],
            }
            self.folder.save(
                record,
                self.folder.record_path(seed, DENSE, 0),
                checkpoint,
                self.folder.checkpoint_path(seed, DENSE, 0),
                owned=True,  # fresh copies, only read from here on
            )
            if hold:
                self._dense_held[seed] = checkpoint
            self.computed += 1
            bar.update()
            records.append(record)
        return records

    # -- one round of every (seed, arm) ---------------------------------------------------

    def round_stage(self, round_index: int, data: Dataset, bar) -> list[dict[str, Any]]:
        if self._finished is None:
            # Read once: the runs of these seeds are this process's alone to write (shards
            # split the seeds), so the folder changes from here on only by the rounds run here.
            self.folder.flush()
            self._finished = {
                (seed, arm): self.finished_rounds(seed, arm)
                for seed in self.seeds
                for arm in self.arms()
            }
        out, todo = [], []
        for seed in self.seeds:
            for arm in self.arms():
                finished = self._finished[(seed, arm)]
                if len(finished) >= round_index:
                    out.append(finished[round_index - 1])
                    self.reused += 1
                    bar.update()
                else:
                    todo.append((seed, arm))
        held, self._round_held = self._round_held, {}
        hold = len(todo) <= self.max_stack
        for cells in self._chunks(todo):
            out.extend(self._round_stack(round_index, cells, data, bar, held, hold))
        return out

    def _round_stack(
        self,
        round_index: int,
        cells: list[tuple[int, str]],
        data: Dataset,
        bar,
        held: dict[tuple[int, str], dict[str, Any]] | None = None,
        hold: bool = False,
    ) -> list[dict[str, Any]]:
        """One round of ``cells``, from the checkpoints of the round before (those ``held``,
        else from the folder); ``hold``: keep this round's checkpoints for the next."""
        config = self.config
        start = time.perf_counter()
        held = {} if held is None else held
        states, rewinds = [], []
        for seed, arm in cells:
            dense = self._dense_checkpoint(seed)
            previous = dense if round_index == 1 else held.pop((seed, arm), None)
            if previous is None:
                path = self.folder.checkpoint_path(seed, arm, round_index - 1)
                previous = self.folder.load_checkpoint(path)
            states.append(previous)
            rewinds.append(dense["rewind"] or None)
        template = self._template(data)
        # The stack as the checkpoints hold it, on the CPU, where the models are pruned; and
        # its copy on the device, which scores the gradients now and trains once the pruned
        # (and rewound) weights are copied in.
        host = stack_states(template, [state["model"] for state in states])
        stacked = copy.deepcopy(host).to(self.device)
        # The gradient criteria's gradients, of every model at once; then each model is
        # pruned by its own pruner, in turn, on a view of its slice of the host stack (the
        # one template rebound to each slice).
        estimates = [self.estimate(arm) for _, arm in cells]
        gradients = stacked_gradients(
            stacked,
            [
                self.scoring_batches(seed, arm, round_index, data)
                if arm != CONTROL and parse_arm(arm)[0] in NEEDS_GRADIENT and estimate != "average"
                else None
                for (seed, arm), estimate in zip(cells, estimates, strict=True)
            ],
            self.device,
            out="cpu",
            balanced=[arm != CONTROL and parse_arm(arm)[0] in CLASS_BALANCED for _, arm in cells],
        )
        pruners, schedules = [], []
        for i, ((seed, arm), state, rewind) in enumerate(zip(cells, states, rewinds, strict=True)):
            view = model_view(host, i, template)
            # No optimizer: the stack's own trains, with the masks stacked below. UP's lam is
            # the weight decay that the sequential round's optimizer gives every pruned weight.
            pruner = self.pruner(
                view,
                arm,
                None,
                seed=phase_seed(seed, self.base(arm), round_index),
                lam=config.weight_decay,
            )
            if state["masks"]:
                pruner.masks.update({k: v.cpu() for k, v in state["masks"].items()})
                pruner.apply()
            schedule = self.schedule()
            schedule.load_state_dict({"round": round_index - 1, "snapshot": rewind})
            pruners.append(pruner)
            schedules.append(schedule)
        # Every pruned model of the stack by one selection (each with its own criterion and
        # exact count), as each would be by its schedule's prune_round.
        pruned = [i for i, (_, arm) in enumerate(cells) if arm != CONTROL]
        given = []
        for i in pruned:
            seed, arm = cells[i]
            own = gradients[i]
            if estimates[i] == "average":
                where = f"the checkpoint before round {round_index} of seed {seed}, {arm}"
                own = self.average_gradients(states[i].get("grad_average"), pruners[i], where)
            given.append(None if own is None else {n: own[n] for n in pruners[i].params})
        prune_together([pruners[i] for i in pruned], self.schedule().fraction, given)
        masks: list[dict[str, torch.Tensor]] = []
        sparsities = []
        for i, (pruner, schedule) in enumerate(zip(pruners, schedules, strict=True)):
            model_view(host, i, template)  # the template on model i again, to rewind it
            schedule.finish_round(pruner)
            masks.append({k: v.clone() for k, v in pruner.masks.items()})
            sparsities.append(pruner.sparsity())
        stacked.load_state_dict(host.state_dict())
        track = "average" in estimates
        host_masks = {name: torch.stack([m[name] for m in masks]) for name in masks[0]}
        device_masks = {name: mask.to(self.device) for name, mask in host_masks.items()}
        if self.device.type == "cpu":
            # The linear layers hold, compute with and step their kept weights alone (the CPU
            # kernels skip the pruned ones), as a masked optimizer would keep them: the same
            # updates of the same weights.
            stacked.compact(device_masks, below=COMPACT_BELOW)
        optimizer = self._optimizer(stacked, self.retrain_lr(), track)
        parameters = dict(stacked.named_parameters())
        for name, mask in device_masks.items():
            if name in parameters:  # not compact
                optimizer.set_mask(parameters[name], mask)
        generators = [
            torch.Generator().manual_seed(phase_seed(seed, self.base(arm), round_index, "train"))
            for seed, arm in cells
        ]
        multipliers = self.stacked_multipliers(cells, data, states)
        losses = train_stacked(
            stacked,
            optimizer,
            data,
            config.finetune_epochs,
            config.batch_size,
            self.device,
            generators,
            on_epoch=last_epoch_average(optimizer, config.finetune_epochs) if track else None,
            multipliers=multipliers,
        )
        confusions = evaluate_stacked(stacked, data, self.device)
        seconds = (time.perf_counter() - start) / len(cells)
        mitigated = [self.mitigation(arm) != NONE for _, arm in cells]
        averages = stacked_averages(optimizer, stacked) if track else [{} for _ in cells]
        nominal = self.schedule().sparsity_after(round_index)
        stacked.expand()
        model_states = stacked.model_states()
        self.folder.flush()  # the stage before's files (and their errors) first
        records = []
        for i, (seed, arm) in enumerate(cells):
            own = multipliers is not None and mitigated[i]
            record = make_record(
                confusions[i],
                seed,
                arm,
                round_index,
                nominal,
                sparsities[i],
                losses[i],
                seconds,
                multipliers=[m[i] for m in multipliers.history] if own else None,
                violations=[v[i] for v in multipliers.violations] if own else None,
            )
            checkpoint = {
                "model": model_states[i],
                "masks": {name: mask[i].clone() for name, mask in host_masks.items()},
                "grad_average": averages[i] if estimates[i] == "average" else {},
            }
            if own:  # carried to the next round
                checkpoint["multipliers"] = multipliers.value[i].cpu().clone()
            self.folder.save(
                record,
                self.folder.record_path(seed, arm, round_index),
                checkpoint,
                self.folder.checkpoint_path(seed, arm, round_index),
                owned=True,  # fresh copies, only read from here on
            )
            if round_index > 1:
                self.folder.drop_checkpoint(self.folder.checkpoint_path(seed, arm, round_index - 1))
            if hold:
                self._round_held[(seed, arm)] = checkpoint
            self.computed += 1
            bar.update()
            records.append(record)
        return records


def make_study(config, out, progress: bool = True, shard: tuple[int, int] | None = None) -> Study:
    """The study its config asks for: batched (where the model allows) or sequential; with
    ``shard`` (i, n), only every n-th seed from the i-th."""
    if config.execution == "batched":
        return BatchedStudy(config, out, progress=progress, shard=shard, max_stack=config.max_stack)
    return Study(config, out, progress=progress, shard=shard)
