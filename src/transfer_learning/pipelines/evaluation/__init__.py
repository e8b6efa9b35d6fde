"""Evaluation: the same test-split metrics and plots for every strategy."""

from .pipeline import STRATEGIES, create_pipeline, evaluation_for

__all__ = ["STRATEGIES", "create_pipeline", "evaluation_for"]
