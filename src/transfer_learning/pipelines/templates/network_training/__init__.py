"""Training a network under a strategy's namespace: every strategy of the network kind."""

from .pipeline import network_training_pipeline

__all__ = ["network_training_pipeline"]
