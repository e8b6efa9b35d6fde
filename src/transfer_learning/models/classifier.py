"""The fine-tuned network: a backbone's features and a new linear head."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from transfer_learning.models.backbones import (
    Backbone,
    BackboneSettings,
    build_backbone,
)


class Classifier(nn.Module):
    """Backbone features → a new linear head sized to the task's classes."""

    def __init__(self, features: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def build_classifier(
    backbone_settings: BackboneSettings, n_classes: int, seed: int
) -> tuple[Classifier, Backbone]:
    """The registry's backbone (pretrained or random) with a fresh head for `n_classes` (with
    several tasks: every task's classes side by side, `task_sizes` splits the outputs).

    The head's initial weights come from `seed` inside a forked RNG: the global one is untouched.
    """
    backbone = build_backbone(backbone_settings, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(backbone.feature_dim, n_classes)
    return Classifier(backbone.features, head), backbone


def network_from_checkpoint(checkpoint: Mapping[str, Any]) -> tuple[Classifier, Backbone]:
    """The trained classifier (in eval mode) and its backbone's description (preprocessing)."""
    settings = BackboneSettings(
        name=checkpoint["backbone_name"],
        image_size=checkpoint["image_size"] or None,
        pretrained=False,
    )
    model, backbone = build_classifier(settings, checkpoint["n_classes"], seed=0)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), backbone
