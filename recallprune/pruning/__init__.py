"""Pruning: criteria (magnitude, gradient, undecayed, random), the Pruner, and schedules."""

from .criteria import CRITERIA, score
from .pruner import Pruner, select_lowest
from .schedules import Gradual, Iterative, OneShot

__all__ = ["CRITERIA", "Gradual", "Iterative", "OneShot", "Pruner", "score", "select_lowest"]
