"""Per-class confusion counts on the device."""

from .confusion import ConfusionCounter, confusion_matrix

__all__ = ["ConfusionCounter", "confusion_matrix"]
