"""Pruning: criteria (magnitude, gradient, undecayed, random), the Pruner, and schedules."""

from .criteria import CRITERIA, score
from .pruner import Pruner, prune_together, select_lowest, select_lowest_stacked
from .schedules import Gradual, Iterative, OneShot

__all__ = [
    "CRITERIA",
    "Gradual",
    "Iterative",
    "OneShot",
    "Pruner",
    "prune_together",
    "score",
    "select_lowest",
    "select_lowest_stacked",
]
