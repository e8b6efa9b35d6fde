"""Feature extraction: every indexed image through the frozen backbone."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
