"""Evaluation: the same test-split metrics and plots for every strategy."""

from .pipeline import create_pipeline, evaluation_for

__all__ = ["create_pipeline", "evaluation_for"]
