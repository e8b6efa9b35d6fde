"""What every adaptation method is: a name, the strategy kind it applies to, its settings block
and `adapt()`, and the source model it adapts (a head on features, or a trained network).

Target images reach a method as locations or features only, never with labels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from sklearn.pipeline import Pipeline

from transfer_learning.models.heads import HeadSettings
from transfer_learning.training.recipe import Recipe


class AdaptationError(ValueError):
    """Domain adaptation cannot run as configured."""


@dataclass(frozen=True)
class FeatureSource:
    """What a method of the features kind adapts: the fitted head and the features it saw."""

    head: Pipeline
    train: tuple[np.ndarray, np.ndarray]  # (features, labels) of the source train split
    val: tuple[np.ndarray, np.ndarray]
    target_features: np.ndarray  # unlabelled
    head_settings: HeadSettings  # how the strategy chose and fitted its head


@dataclass(frozen=True)
class NetworkSource:
    """What a method of the network kind adapts: the trained network's checkpoint and recipe."""

    checkpoint: Mapping[str, Any]
    recipe: Recipe
    train_locations: Sequence[str]  # the labelled source train images
    train_labels: np.ndarray
    target_locations: Sequence[str]  # unlabelled
    device: torch.device


@dataclass(frozen=True)
class AdaptationMethod:
    """One domain adaptation method, as the registry lists it.

    `adapt(source, settings, seed)` returns the adapted model: a head (a scikit-learn Pipeline)
    for the features kind, a checkpoint (a dict like the strategy's) for the network kind.
    `settings` is an instance of `settings_class`, read from `adaptation.<name>`.
    """

    name: str
    kind: str  # the strategy kind it applies to (core.strategies.FEATURES or NETWORK)
    adapt: Callable[[Any, Any, int], Any]
    settings_class: type | None = None  # a frozen dataclass with an `invalid()` method
    needs_batchnorm: bool = False  # applies only to networks with BatchNorm layers


def invalid_fields(settings: Any, checks: Mapping[str, Callable[[Any], bool]]) -> list[str]:
    """The names of `settings`' fields whose value fails its check."""
    return [f.name for f in fields(settings) if not checks[f.name](getattr(settings, f.name))]
