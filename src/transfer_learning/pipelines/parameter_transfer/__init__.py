"""Parameter transfer: fine-tune the pretrained backbone with a new head."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
