"""A run's record: what one trained model scored on the test set; recall and accuracy come
from the distortion analysis."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..distortion import CONTROL, recall_and_accuracy

DENSE = "dense"  # the criterion of the dense models (round 0)
__all__ = ["CONTROL", "DENSE", "make_record"]


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
