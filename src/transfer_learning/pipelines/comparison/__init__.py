"""Comparison: the strategies' test metrics side by side."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
