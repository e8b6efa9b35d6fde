"""Structure transfer: the same architecture and recipe, from random initialisation."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
