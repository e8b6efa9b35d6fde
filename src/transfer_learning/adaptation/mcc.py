"""MCC (Jin et al. 2020): continued fine-tuning on labelled source batches with the Minimum
Class Confusion loss on unlabelled target batches."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from transfer_learning.adaptation.base import (
    AdaptationMethod,
    NetworkSource,
    invalid_fields,
)
from transfer_learning.adaptation.network import SourceNetwork, TargetImages
from transfer_learning.core.config import positive_int
from transfer_learning.core.strategies import NETWORK
from transfer_learning.data.loading import (
    ImageDataset,
    image_loader,
    shuffled,
)
from transfer_learning.training.data import LabelledImages, train_augmentation
from transfer_learning.training.optim import parameter_groups
from transfer_learning.training.recipe import Recipe
from transfer_learning.training.trainer import isolated_randomness_and_threads, train_steps

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MccSettings:
    steps: int = 100  # continued fine-tuning steps from the source-only network
    lr: float = 1e-4
    temperature: float = 2.5  # MCC's (and TLlib's) default
    weight: float = 1.0  # of the MCC loss next to the source cross-entropy

    def invalid(self) -> list[str]:
        checks = {
            "steps": positive_int,
            "lr": lambda value: value > 0,
            "temperature": lambda value: value > 0,
            "weight": lambda value: value >= 0,
        }
        return invalid_fields(self, checks)


def mcc_loss(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Minimum Class Confusion (Jin et al. 2020): the off-diagonal mass of the batch's
    class-confusion matrix, samples weighted by certainty, rows normalised, divided by the
    number of classes (as TLlib's reference implementation)."""
    batch, classes = logits.shape
    probabilities = torch.softmax(logits / temperature, dim=1)
    entropy = -(probabilities * torch.log(probabilities + 1e-5)).sum(dim=1).detach()
    weight = 1.0 + torch.exp(-entropy)
    weight = (batch * weight / weight.sum()).unsqueeze(1)
    confusion = (probabilities * weight).T @ probabilities
    confusion = confusion / confusion.sum(dim=1, keepdim=True)
    return (confusion.sum() - confusion.trace()) / classes


@dataclass(frozen=True)
class SourceBatches:
    """Labelled, augmented source training batches, reshuffled each pass by (seed, pass)."""

    dataset: Dataset  # yields (uint8 image, label), augmented as in fine-tuning
    batch_size: int
    device: torch.device

    def forever(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return _batches_forever(self.dataset, self.batch_size, self.device, seed)


def train_mcc(
    network: nn.Module,
    source: SourceBatches,
    target: TargetImages,
    target_augment: Callable[[torch.Tensor], torch.Tensor],
    settings: MccSettings,
    seed: int,
    make_parameter_groups: Callable[[float], list[dict[str, Any]]],
    label_smoothing: float = 0.0,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Continue fine-tuning the source network: cross-entropy on source batches plus
    `weight` × MCC on equally many augmented target batches, through the network together (as
    TLlib does, so BatchNorm sees both domains), AdamW with a cosine decay over `steps`.

    `make_parameter_groups(lr)` gives the optimiser groups (no weight decay on 1-D tensors, as
    in fine-tuning). Returns the network and the per-step losses.
    """
    optimizer = torch.optim.AdamW(make_parameter_groups(settings.lr))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / settings.steps))
    )
    target_data = ImageDataset(target.locations, target_augment, target.collate.transform.size)
    target_batches = _batches_forever(target_data, source.batch_size, target.device, seed + 1)
    source_batches = source.forever(seed)
    network.train()

    def batches():  # source then target, as many steps as asked
        for _ in range(settings.steps):
            yield next(source_batches), next(target_batches)

    def loss_of(batch) -> tuple[torch.Tensor, dict[str, float]]:
        (images, labels), target_images = batch
        # Through the network together (as TLlib does), so BatchNorm sees both domains.
        logits = network(target.normalise(torch.cat([images, target_images])))
        labels = labels.to(target.device)
        source_loss = nn.functional.cross_entropy(
            logits[: len(labels)], labels, label_smoothing=label_smoothing
        )
        confusion = mcc_loss(logits[len(labels) :].float(), settings.temperature)
        logged = {"source_loss": source_loss.item(), "mcc_loss": confusion.item()}
        return source_loss + settings.weight * confusion, logged

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # augmentation and dropout
        history = train_steps(
            batches(),
            loss_of,
            optimizer,
            target.device,
            "mcc",
            f": lower adaptation.mcc.lr (now {settings.lr}).",
            scheduler=schedule,
            grad_clip=1.0,
        )
    return network.eval(), history


def _batches_forever(dataset: Dataset, batch_size: int, device: torch.device, seed: int):
    """Full batches, reshuffled on every pass by (seed, pass), without end."""
    batch_size = min(batch_size, len(dataset))
    for repeat in itertools.count():
        order = shuffled(dataset, seed * 1000 + repeat)
        yield from image_loader(dataset, batch_size, 0, device, sampler=order, drop_last=True)


def mcc_checkpoint(  # noqa: PLR0913 (source data, target data, recipe, settings, seed, device)
    checkpoint: Mapping[str, Any],
    recipe: Recipe,
    source_locations: Sequence[str],
    source_labels: np.ndarray,
    target_locations: Sequence[str],
    settings: MccSettings,
    seed: int,
    device: torch.device,
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """The fine-tuned checkpoint after MCC training (see `train_mcc`), and its loss history.

    Source batches are the fine-tuning recipe's (batch size, crops, flips, label smoothing).
    """
    source = SourceNetwork.from_checkpoint(checkpoint, device)
    size = source.collate.transform.size
    augment = train_augmentation(recipe.finetune, size)
    labelled = LabelledImages(
        ImageDataset(source_locations, augment, min_size=size),
        torch.tensor(np.array(source_labels), dtype=torch.long),
    )
    network = source.network
    with isolated_randomness_and_threads(device):
        _, history = train_mcc(
            network,
            SourceBatches(labelled, int(recipe.finetune.batch_size), device),
            source.target_images(target_locations),
            augment,
            settings,
            seed,
            lambda lr: parameter_groups(network, replace(recipe.finetune, lr=lr), "all"),
            label_smoothing=recipe.finetune.label_smoothing,
        )
    return source.adapted_checkpoint(), history


def adapt(source: NetworkSource, settings: MccSettings, seed: int) -> dict[str, Any]:
    checkpoint, history = mcc_checkpoint(
        source.checkpoint,
        source.recipe,
        source.train_locations,
        source.train_labels,
        source.target_locations,
        settings,
        seed,
        source.device,
    )
    logger.info(
        "mcc: %d steps, source loss %.4f → %.4f, MCC loss %.4f → %.4f",
        len(history),
        history[0]["source_loss"],
        history[-1]["source_loss"],
        history[0]["mcc_loss"],
        history[-1]["mcc_loss"],
    )
    return checkpoint


METHOD = AdaptationMethod("mcc", NETWORK, adapt, MccSettings)
