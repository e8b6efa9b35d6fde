"""The learning_curve pipeline: accuracy against labelled images per class, per strategy."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
