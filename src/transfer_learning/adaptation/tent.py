"""TENT (Wang et al. 2021): minimise the entropy of target predictions, updating only the
BatchNorm scale and shift."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from transfer_learning.adaptation.adabn import adapt_batchnorm
from transfer_learning.adaptation.base import (
    AdaptationError,
    AdaptationMethod,
    NetworkSource,
    invalid_fields,
)
from transfer_learning.adaptation.network import SourceNetwork, TargetImages, batchnorm_layers
from transfer_learning.core.config import positive_int
from transfer_learning.core.strategies import NETWORK
from transfer_learning.training.trainer import isolated_randomness_and_threads, train_steps

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TentSettings:
    epochs: int = 1  # passes over the target images; TENT's own setting is one online pass
    batch_size: int = 64
    lr: float = 1e-3  # Adam, as TENT on CIFAR-10-C

    def invalid(self) -> list[str]:
        return invalid_fields(
            self, {"epochs": positive_int, "batch_size": positive_int, "lr": lambda v: v > 0}
        )


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of the softmax predictions."""
    log_p = torch.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()


def tent(network: nn.Module, images: TargetImages, settings: TentSettings, seed: int) -> nn.Module:
    """TENT: minimise the entropy of target predictions made with target batch statistics,
    updating only the BatchNorm scale and shift; then AdaBN, so the served network needs no batch.
    """
    layers = batchnorm_layers(network)
    if not layers:
        raise AdaptationError("tent needs a network with BatchNorm layers; this one has none.")
    network.eval().requires_grad_(False)
    affine = []
    for layer in layers:
        layer.train()  # batch statistics, as at test time in TENT
        for parameter in (layer.weight, layer.bias):
            if parameter is not None:
                parameter.requires_grad_(True)
                affine.append(parameter)
    optimizer = torch.optim.Adam(affine, lr=settings.lr, betas=(0.9, 0.999))
    batches = itertools.chain.from_iterable(
        images.loader(settings.batch_size, seed=seed * 1000 + epoch, drop_last=True)
        for epoch in range(settings.epochs)
    )
    history = train_steps(
        batches,
        lambda batch: (prediction_entropy(network(images.normalise(batch))), {}),
        optimizer,
        images.device,
        "tent",
        f": lower adaptation.tent.lr (now {settings.lr}).",
    )
    logger.info(
        "tent: %d steps, entropy %.4f → %.4f",
        len(history),
        history[0]["loss"],
        history[-1]["loss"],
    )
    network.requires_grad_(True)
    return adapt_batchnorm(network, images, settings.batch_size)


def tent_checkpoint(
    checkpoint: Mapping[str, Any],
    target_locations: Sequence[str],
    settings: TentSettings,
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """The fine-tuned checkpoint after TENT on the target images (see `tent`)."""
    source = SourceNetwork.from_checkpoint(checkpoint, device)
    with isolated_randomness_and_threads(device):
        tent(source.network, source.target_images(target_locations), settings, seed)
    return source.adapted_checkpoint()


def adapt(source: NetworkSource, settings: TentSettings, seed: int) -> dict[str, Any]:
    return tent_checkpoint(
        source.checkpoint, source.target_locations, settings, seed, source.device
    )


METHOD = AdaptationMethod("tent", NETWORK, adapt, TentSettings, needs_batchnorm=True)
