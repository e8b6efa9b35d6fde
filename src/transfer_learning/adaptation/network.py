"""What the network-level methods share: the source network rebuilt from its checkpoint, the
unlabelled target images, its BatchNorm layers."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from transfer_learning.adaptation.base import AdaptationError
from transfer_learning.data.loading import (
    EvalCollate,
    ImageDataset,
    Normaliser,
    image_loader,
    shuffled,
)
from transfer_learning.models.classifier import network_from_checkpoint

logger = logging.getLogger(__name__)


def batchnorm_layers(network: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The network's BatchNorm layers (timm's BatchNormAct2d is one)."""
    return [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@dataclass(frozen=True)
class TargetImages:
    """The unlabelled target images and how the network wants them (no labels exist here)."""

    locations: Sequence[str]
    collate: EvalCollate
    normalise: Normaliser
    device: torch.device

    def loader(self, batch_size: int, seed: int | None = None, drop_last: bool = False):
        """Batches of normalised target images, shuffled by `seed` (in order when None)."""
        dataset = ImageDataset(self.locations, min_size=self.collate.transform.size)
        return image_loader(
            dataset,
            batch_size,
            0,  # adaptation is short: worker start-up would cost more than decoding
            self.device,
            sampler=None if seed is None else shuffled(dataset, seed),
            drop_last=drop_last and len(dataset) >= 2 * batch_size,
            collate_fn=self.collate,
        )


def has_batchnorm(checkpoint: Mapping[str, Any]) -> bool:
    """Whether a fine-tuned checkpoint's network has BatchNorm layers (running statistics)."""
    return any(key.endswith("running_mean") for key in checkpoint["state_dict"])


@dataclass
class SourceNetwork:
    """A network strategy's fine-tuned network, rebuilt from its checkpoint (no download)."""

    network: nn.Module
    checkpoint: Mapping[str, Any]
    collate: EvalCollate
    normalise: Normaliser
    device: torch.device

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, Any], device: torch.device) -> SourceNetwork:
        network, backbone = network_from_checkpoint(checkpoint)
        network = network.to(device).to(memory_format=torch.channels_last)
        preprocessing = backbone.preprocessing
        return cls(
            network,
            checkpoint,
            EvalCollate(preprocessing),
            Normaliser(preprocessing).to(device),
            device,
        )

    def target_images(self, locations: Sequence[str]) -> TargetImages:
        if not len(locations):
            raise AdaptationError("There are no target images to adapt to (data.target_path).")
        return TargetImages(list(locations), self.collate, self.normalise, self.device)

    def adapted_checkpoint(self) -> dict[str, Any]:
        """The checkpoint with the adapted weights (and BatchNorm statistics), on the CPU."""
        state = {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()}
        return {**self.checkpoint, "state_dict": state}
