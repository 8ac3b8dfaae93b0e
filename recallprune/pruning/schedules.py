"""Pruning schedules: small objects that say how much to prune when and drive a Pruner.
The training loop stays the user's.

- :class:`OneShot`: prune once to a target sparsity, then fine-tune.
- :class:`Iterative`: ``rounds`` rounds, each pruning ``fraction`` of the remaining weights,
  then fine-tuning or rewinding the survivors to an early snapshot (lottery-ticket style).
- :class:`Gradual`: the cubic ramp of Zhu & Gupta (2017) from an initial to a final
  sparsity between two steps, pruning every ``frequency`` steps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .pruner import Pruner

RETRAIN_MODES = ("finetune", "rewind")


class OneShot:
    """Prune to ``sparsity`` in one go."""

    def __init__(self, sparsity: float) -> None:
        if not 0 <= sparsity <= 1:
            raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
        self.sparsity = sparsity

    def prune(self, pruner: Pruner, **prune_kwargs: Any) -> int:
        return pruner.prune(sparsity=self.sparsity, **prune_kwargs)


class Iterative:
    """``rounds`` rounds of pruning ``fraction`` of the remaining weights; after round ``r``
    the sparsity is ``1 - (1 - fraction) ** r`` (up to rounding to whole weights).

    ``retrain="rewind"``: call :meth:`snapshot` at the rewinding step of the first training
    run; :meth:`prune_round` then resets the surviving weights (and the model's buffers) to
    that snapshot. :meth:`control_round` runs a round that prunes nothing, for a control arm
    retrained exactly as the pruned ones; :meth:`state_dict` and :meth:`load_state_dict`
    let a run resume after its last finished round.
    """

    def __init__(self, rounds: int, fraction: float = 0.2, retrain: str = "finetune") -> None:
        if rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {rounds}")
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
        if retrain not in RETRAIN_MODES:
            raise ValueError(f"retrain must be one of {RETRAIN_MODES}, got {retrain!r}")
        self.rounds = rounds
        self.fraction = fraction
        self.retrain = retrain
        self.round = 0
        self._snapshot: dict[str, torch.Tensor] | None = None

    def sparsity_after(self, round_index: int) -> float:
        """The nominal sparsity after ``round_index`` rounds."""
        return 1.0 - (1.0 - self.fraction) ** round_index

    @property
    def done(self) -> bool:
        return self.round >= self.rounds

    @torch.no_grad()
    def snapshot(self, model: nn.Module) -> None:
        """Remember the state to rewind to (an early step of the first training run): the
        parameters and the buffers, so that normalisation statistics match the weights."""
        self._snapshot = {name: t.detach().clone() for name, t in model.state_dict().items()}

    def prune_round(self, pruner: Pruner, **prune_kwargs: Any) -> int:
        """Run the next round: prune ``fraction`` of the remaining weights and, when
        rewinding, reset the survivors (all parameters) to the snapshot."""
        self._check_not_done()
        pruned = pruner.prune(amount=self.fraction, **prune_kwargs)
        self._end_round(pruner)
        return pruned

    def control_round(self, pruner: Pruner) -> None:
        """Run the next round without pruning: a control arm's round, rewound (or not) as
        the pruned arms' rounds are, so that it differs from them in the pruning alone."""
        self.finish_round(pruner)

    def finish_round(self, pruner: Pruner) -> None:
        """The rest of a round whose pruning was done apart (by
        :func:`~recallprune.pruning.prune_together` with ``amount=fraction``, for the models
        of a stack): count the round and, when rewinding, reset the survivors."""
        self._check_not_done()
        self._end_round(pruner)

    def _check_not_done(self) -> None:
        if self.done:
            raise RuntimeError(f"all {self.rounds} rounds have been run")

    def _end_round(self, pruner: Pruner) -> None:
        self.round += 1
        if self.retrain == "rewind":
            self.rewind(pruner)

    def state_dict(self) -> dict[str, Any]:
        """The rounds run so far and the rewinding snapshot (``None`` before one is taken)."""
        return {"round": self.round, "snapshot": self._snapshot}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after ``state["round"]`` rounds, rewinding to ``state["snapshot"]``."""
        round_index = state["round"]
        if isinstance(round_index, bool) or not isinstance(round_index, int):
            raise TypeError(f"round must be an integer, got {round_index!r}")
        if not 0 <= round_index <= self.rounds:
            raise ValueError(f"round must lie in [0, {self.rounds}], got {round_index}")
        self.round = round_index
        self._snapshot = state.get("snapshot")

    @torch.no_grad()
    def rewind(self, pruner: Pruner) -> None:
        """Reset every parameter and buffer to the snapshot; pruned weights stay zero."""
        if self._snapshot is None:
            raise RuntimeError("retrain='rewind' needs snapshot(model) before the first round")
        pruner.model.load_state_dict(self._snapshot)
        pruner.apply()
        if pruner.optimizer is not None:
            # The rewound network starts its training afresh: no stale momentum.
            for p in pruner.model.parameters():
                state = pruner.optimizer.state.get(p)
                if state is not None and "momentum_buffer" in state:
                    del state["momentum_buffer"]


class Gradual:
    """Sparsity ``s(t) = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3`` for
    ``t0 <= t <= t1``, pruning at ``t0`` and every ``frequency`` steps after, up to ``t1``.
    Call :meth:`step` once per training step."""

    def __init__(
        self,
        final_sparsity: float,
        start_step: int,
        end_step: int,
        frequency: int = 100,
        initial_sparsity: float = 0.0,
    ) -> None:
        if not 0 <= initial_sparsity <= final_sparsity <= 1:
            raise ValueError(
                "need 0 <= initial_sparsity <= final_sparsity <= 1, got "
                f"{initial_sparsity} and {final_sparsity}"
            )
        if not 0 <= start_step < end_step:
            raise ValueError(f"need 0 <= start_step < end_step, got {start_step}, {end_step}")
        if frequency < 1:
            raise ValueError(f"frequency must be at least 1, got {frequency}")
        self.initial_sparsity = initial_sparsity
        self.final_sparsity = final_sparsity
        self.start_step = start_step
        self.end_step = end_step
        self.frequency = frequency

    def sparsity_at(self, step: int) -> float:
        if step <= self.start_step:
            return self.initial_sparsity
        if step >= self.end_step:
            return self.final_sparsity
        progress = (step - self.start_step) / (self.end_step - self.start_step)
        return (
            self.final_sparsity
            + (self.initial_sparsity - self.final_sparsity) * (1 - progress) ** 3
        )

    def is_pruning_step(self, step: int) -> bool:
        if step < self.start_step or step > self.end_step:
            return False
        return (step - self.start_step) % self.frequency == 0 or step == self.end_step

    def step(self, pruner: Pruner, step: int, **prune_kwargs: Any) -> int:
        """Prune to ``sparsity_at(step)`` if ``step`` is a pruning step; returns how many
        weights were newly pruned."""
        if not self.is_pruning_step(step):
            return 0
        return pruner.prune(sparsity=self.sparsity_at(step), **prune_kwargs)
