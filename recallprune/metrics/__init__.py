"""Per-class confusion counts on the device."""

from .confusion import ConfusionCounter, StackedConfusionCounter, confusion_matrix

__all__ = ["ConfusionCounter", "StackedConfusionCounter", "confusion_matrix"]
