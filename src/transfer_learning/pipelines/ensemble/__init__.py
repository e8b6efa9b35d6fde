"""Ensemble: the pretrained strategies' calibrated models, their probabilities weighted on val."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
