"""Feature transfer: a scikit-learn head on frozen pretrained features."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
