"""A run's record (what one trained model scored on the test set) and the schema of the
results file that gathers them; recall and accuracy come from the distortion analysis."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..distortion import CONTROL, recall_and_accuracy
from .files import StudyError

DENSE = "dense"  # the criterion of the dense models (round 0)
__all__ = ["CONTROL", "DENSE", "check_results", "make_record"]

# What a record holds, in this order (results.json "runs" and the run files).
RUN_FIELDS = (
    "seed",
    "criterion",
    "round",
    "nominal_sparsity",
    "sparsity",
    "accuracy",
    "recall",
    "support",
    "confusion",
    "train_loss",
    "seconds",
)
# The settings the report reads from results.json "config".
REPORT_CONFIG_KEYS = (
    "dataset",
    "model",
    "seeds",
    "criteria",
    "fraction",
    "rounds",
    "retrain",
    "scope",
    "epochs",
    "finetune_epochs",
    "batch_size",
    "lr",
    "finetune_lr",
    "momentum",
    "weight_decay",
    "device",
)


def make_record(
    confusion: torch.Tensor,
    seed: int,
    criterion: str,
    round_index: int,
    nominal: float,
    sparsity: float,
    train_loss: float,
    seconds: float,
    multipliers: list[torch.Tensor] | None = None,
    violations: list[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """A run's record; a mitigated run's also holds its multipliers after each fine-tuning
    epoch and the violation measured in each (lists of per-class lists)."""
    recall, accuracy = recall_and_accuracy(confusion)
    record = {
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
    if multipliers is not None:
        record["multipliers"] = [[float(v) for v in m] for m in multipliers]
    if violations is not None:
        record["violations"] = [[_number(v) for v in m] for m in violations]
    return record


def _number(value: Any) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def _schema_problem(results: Any) -> str | None:
    if not isinstance(results, dict):
        return f"it holds a JSON {type(results).__name__}, not an object"
    missing = [key for key in ("config", "runs") if key not in results]
    if missing:
        return f"no {' and no '.join(repr(k) for k in missing)} entry"
    config, runs = results["config"], results["runs"]
    if not isinstance(config, dict):
        return "'config' is not an object"
    missing = [key for key in REPORT_CONFIG_KEYS if key not in config]
    if missing:
        return f"'config' lacks {', '.join(missing)}"
    if not isinstance(runs, list):
        return "'runs' is not a list"
    for index, run in enumerate(runs):
        if not isinstance(run, dict):
            return f"run {index} is not an object"
        missing = [key for key in RUN_FIELDS[:-2] if key not in run]
        if missing:
            return f"run {index} lacks {', '.join(missing)}"
    if "analysis" in results and not isinstance(results["analysis"], dict):
        return "'analysis' is not an object"
    return None


def check_results(results: Any, path: Path) -> dict[str, Any]:
    """``results`` if it has the shape of a recallprune results file, else a StudyError."""
    problem = _schema_problem(results)
    if problem is not None:
        raise StudyError(
            f"{path} is not a recallprune results file ({problem}); nothing was overwritten"
        )
    return results
