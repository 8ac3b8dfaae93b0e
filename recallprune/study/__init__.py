"""The end-to-end recall-distortion study (``recallprune study``)."""

from .config import StudyConfig
from .files import StudyError
from .runner import Study

__all__ = ["Study", "StudyConfig", "StudyError"]
