"""label_next: which unlabelled images to label next, with a pre-label and a manifest to fill in."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
