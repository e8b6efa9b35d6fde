"""Domain adaptation: make feature_transfer's and parameter_transfer's models work on target
images that look different, from unlabelled target images."""

from .pipeline import create_pipeline, source_strategies

__all__ = ["create_pipeline", "source_strategies"]
