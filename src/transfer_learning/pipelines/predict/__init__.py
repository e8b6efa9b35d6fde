"""Predict: label a folder of new images with a trained model of any strategy."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
