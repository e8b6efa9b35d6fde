"""AdaBN (Li et al. 2017): BatchNorm statistics re-estimated on the target images."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from transfer_learning.adaptation.base import AdaptationError, AdaptationMethod, NetworkSource
from transfer_learning.adaptation.network import SourceNetwork, TargetImages, batchnorm_layers
from transfer_learning.core.strategies import NETWORK
from transfer_learning.training.trainer import isolated_randomness_and_threads

logger = logging.getLogger(__name__)


@torch.no_grad()
def adapt_batchnorm(network: nn.Module, images: TargetImages, batch_size: int = 64) -> nn.Module:
    """AdaBN: every BatchNorm layer's running mean and variance re-estimated on the target images
    (an equal-weight average over full batches); no weight changes, dropout stays off."""
    layers = batchnorm_layers(network)
    if not layers:
        raise AdaptationError("adabn needs a network with BatchNorm layers; this one has none.")
    momenta = [layer.momentum for layer in layers]
    network.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over the batches seen
        layer.train()
    for batch in images.loader(batch_size, drop_last=True):
        network(images.normalise(batch))
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
    return network.eval()


def adabn_checkpoint(
    checkpoint: Mapping[str, Any], target_locations: Sequence[str], device: torch.device
) -> dict[str, Any]:
    """The fine-tuned checkpoint with BatchNorm statistics of the target images (AdaBN)."""
    source = SourceNetwork.from_checkpoint(checkpoint, device)
    with isolated_randomness_and_threads(device):
        adapt_batchnorm(source.network, source.target_images(target_locations))
    return source.adapted_checkpoint()


def adapt(source: NetworkSource, settings: None, seed: int) -> dict[str, Any]:
    return adabn_checkpoint(source.checkpoint, source.target_locations, source.device)


METHOD = AdaptationMethod("adabn", NETWORK, adapt, needs_batchnorm=True)
