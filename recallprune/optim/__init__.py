"""Optimizers for pruned networks."""

from .functional import undecayed_sgd
from .undecayed_sgd import UndecayedSGD, decay_param_groups

__all__ = ["UndecayedSGD", "decay_param_groups", "undecayed_sgd"]
