"""recallprune: measure and reduce the recall distortion that pruning causes in classifiers."""

from ._extension import has_ops, load_error
from .metrics import ConfusionCounter, confusion_matrix
from .optim import UndecayedSGD, decay_param_groups

__version__ = "0.1.0"

__all__ = [
    "ConfusionCounter",
    "UndecayedSGD",
    "__version__",
    "confusion_matrix",
    "decay_param_groups",
    "has_ops",
    "load_error",
]
