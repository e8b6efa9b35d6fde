"""Backbone selection: rank candidate pretrained networks on the user's train+val images."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
