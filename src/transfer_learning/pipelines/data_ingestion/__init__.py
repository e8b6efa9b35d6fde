"""Data ingestion: any image source → one versioned image index."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
