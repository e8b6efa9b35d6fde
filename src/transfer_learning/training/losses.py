"""The training criterion: smoothed, logit-adjusted or balanced cross-entropy, several tasks, mixing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchvision.transforms import v2

from transfer_learning.core.tasks import MISSING
from transfer_learning.training.recipe import FinetuneSettings


class TrainingLoss(nn.Module):
    """Cross-entropy (hard or mixed targets) on logits shifted by `logit_offset` in training.

    With offset τ·log(class prior), the network learns logits whose argmax is the balanced-error
    choice (logit-adjusted loss, Menon et al. 2021; balanced softmax at τ = 1, Ren et al. 2020);
    predictions use the raw logits. A zero offset is plain cross-entropy.
    """

    def __init__(
        self, logit_offset: torch.Tensor, weight: torch.Tensor | None, label_smoothing: float
    ) -> None:
        super().__init__()
        self.register_buffer("logit_offset", logit_offset)
        self.register_buffer("weight", weight)
        self.label_smoothing = label_smoothing

    @property
    def task_sizes(self) -> list[int]:
        return [len(self.logit_offset)]

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(
            logits.float() + self.logit_offset,
            targets,
            weight=self.weight,
            label_smoothing=self.label_smoothing,
        )


class MultiTaskLoss(nn.Module):
    """Several tasks on one network: each task's `TrainingLoss` on its slice of the logits, over
    the images with its label, summed with weight 1 (equal) or learned weights (uncertainty).

    A task's term is its mean over the labelled images of the batch × (labelled in the batch) /
    (batch × share of training images labelled): the mean over the batch of per-image losses
    where an image without the label adds 0, rescaled to the task's usual size. Being a per-image
    mean, it splits over processes and micro-batches exactly as a single task's loss does, and a
    batch without any label of a task adds 0 instead of NaN.

    `uncertainty` (Kendall et al. 2018): Σ exp(-s_t)·L_t + s_t/2 with a learned log variance s_t
    per task, so a noisier or harder task weighs less; the weights exp(-s_t) are reported.
    """

    def __init__(
        self, losses: Sequence[TrainingLoss], labelled_share: torch.Tensor, uncertainty: bool
    ) -> None:
        super().__init__()
        self.losses = nn.ModuleList(losses)
        self.register_buffer("labelled_share", labelled_share)
        self.log_variance = nn.Parameter(torch.zeros(len(losses))) if uncertainty else None
        self.label_smoothing = losses[0].label_smoothing

    @property
    def task_sizes(self) -> list[int]:
        return [len(loss.logit_offset) for loss in self.losses]

    def task_losses(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        terms = []
        parts = logits.split(self.task_sizes, 1)
        for task, (loss, part) in enumerate(zip(self.losses, parts, strict=True)):
            labelled = targets[:, task] != MISSING
            if not labelled.any():
                terms.append(part.float().sum() * 0.0)  # in the graph, adds nothing
                continue
            mean = loss(part[labelled], targets[labelled, task])
            terms.append(mean * labelled.sum() / (len(targets) * self.labelled_share[task]))
        return torch.stack(terms)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        terms = self.task_losses(logits, targets)
        if self.log_variance is None:
            return terms.sum()
        return (torch.exp(-self.log_variance) * terms + self.log_variance / 2).sum()

    def task_weights(self) -> list[float]:
        """The weight of each task's loss: 1, or the learned exp(-s_t)."""
        if self.log_variance is None:
            return [1.0] * len(self.losses)
        return torch.exp(-self.log_variance.detach()).cpu().tolist()


def class_prior(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Training-set class frequencies (a class without images counts as one)."""
    counts = torch.bincount(labels, minlength=n_classes).clamp(min=1).float()
    return counts / counts.sum()


def training_criterion(
    labels: torch.Tensor, n_classes: int | Mapping[str, int], recipe: FinetuneSettings
) -> TrainingLoss | MultiTaskLoss:
    """The loss of one task, or of several (`n_classes`: task → classes; `labels` one column
    per task): each task's own loss (its class prior, weights) on the images with its label."""
    if not isinstance(n_classes, Mapping):
        return training_loss(labels, n_classes, recipe)
    labels = labels.reshape(len(labels), -1)
    losses, shares = [], []
    for task, size in enumerate(n_classes.values()):
        labelled = labels[:, task] != MISSING
        losses.append(training_loss(labels[labelled, task], size, recipe))
        shares.append(max(float(labelled.float().mean()), 1e-12))
    return MultiTaskLoss(losses, torch.tensor(shares), recipe.task_weights == "uncertainty")


def training_loss(labels: torch.Tensor, n_classes: int, recipe: FinetuneSettings) -> TrainingLoss:
    prior = class_prior(labels, n_classes)
    tau = {"cross_entropy": 0.0, "balanced_softmax": 1.0}.get(
        recipe.loss, recipe.logit_adjustment_tau
    )
    weight = 1.0 / (n_classes * prior) if recipe.class_weight == "balanced" else None
    return TrainingLoss(tau * prior.log(), weight, recipe.label_smoothing)


def batch_mixing(recipe: FinetuneSettings, n_classes: int) -> nn.Module | None:
    """torchvision's MixUp / CutMix (one of the two per batch when both are on), or None."""
    mixers = [
        mixer(alpha=alpha, num_classes=n_classes)
        for mixer, alpha in ((v2.MixUp, recipe.mixup), (v2.CutMix, recipe.cutmix))
        if alpha > 0
    ]
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
