"""The end-to-end recall-distortion study (``recallprune study``)."""

from .config import StudyConfig
from .runner import Study, StudyError

__all__ = ["Study", "StudyConfig", "StudyError"]
