"""recallprune: measure and reduce the recall distortion that pruning causes in classifiers."""

from . import distortion
from .distortion import analyze, intensification_ratio
from .metrics import ConfusionCounter, StackedConfusionCounter, confusion_matrix
from .mitigation import ConstrainedFinetune
from .ops import has_ops, load_error
from .optim import UndecayedSGD, decay_param_groups
from .pruning import Gradual, Iterative, OneShot, Pruner

__version__ = "0.1.0"

__all__ = [
    "ConfusionCounter",
    "ConstrainedFinetune",
    "Gradual",
    "Iterative",
    "OneShot",
    "Pruner",
    "StackedConfusionCounter",
    "UndecayedSGD",
    "__version__",
    "analyze",
    "confusion_matrix",
    "decay_param_groups",
    "distortion",
    "has_ops",
    "intensification_ratio",
    "load_error",
]
