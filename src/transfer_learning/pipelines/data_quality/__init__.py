"""Data quality: mislabelled images, outliers and duplicates in the user's own data."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
