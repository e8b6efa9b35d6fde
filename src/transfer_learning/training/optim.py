"""What trains and how fast: phases (linear probe, all), parameter groups, optimiser and schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from transfer_learning.models.classifier import Classifier
from transfer_learning.training.recipe import FinetuneSettings


def training_phase(settings: FinetuneSettings, epoch: int) -> str:
    """'head' while the backbone is frozen (linear_probe, lp_ft's first epochs), else 'all'."""
    if settings.mode == "linear_probe":
        return "head"
    if settings.mode == "lp_ft" and epoch < settings.lp_epochs:
        return "head"
    return "all"


def set_trainable(model: Classifier, phase: str) -> None:
    frozen = phase == "head"
    model.features.requires_grad_(not frozen)
    model.head.requires_grad_(True)
    model.train()
    if frozen:
        # A frozen backbone keeps its BatchNorm statistics too (eval mode).
        model.features.eval()


def trainable_parameter_count(model: Classifier, settings: FinetuneSettings) -> int:
    modules = [model.head] if settings.mode == "linear_probe" else [model]
    return sum(p.numel() for module in modules for p in module.parameters())


def parameter_groups(
    model: Classifier, settings: FinetuneSettings, phase: str
) -> list[dict[str, Any]]:
    """Optimiser groups: one rate per depth (with layer_decay, earlier layers learn slower), and
    in each depth weight decay on ≥2-D tensors only — biases and normalisation weights are 1-D
    and are not decayed (as timm does)."""
    by_depth: dict[int, list[nn.Parameter]] = {}
    if phase != "head":
        depth_of: dict[str, int] = {}
        for name, parameter in model.features.named_parameters():
            key = ".".join(name.split(".")[:2])  # e.g. "blocks.3", "conv_stem", "layer2.1"
            by_depth.setdefault(depth_of.setdefault(key, len(depth_of)), []).append(parameter)
    head_depth = len(by_depth)
    by_depth[head_depth] = list(model.head.parameters())
    decay = settings.layer_decay or 1.0
    groups = []
    for depth, params in sorted(by_depth.items()):
        lr = settings.lr * decay ** (head_depth - depth)
        for decayed in (True, False):
            members = [p for p in params if (p.ndim > 1) == decayed]
            if members:
                weight_decay = settings.weight_decay if decayed else 0.0
                groups.append({"params": members, "lr": lr, "weight_decay": weight_decay})
    return groups


def _phase_epochs(settings: FinetuneSettings, phase: str) -> int:
    if settings.mode != "lp_ft":
        return settings.epochs
    return settings.lp_epochs if phase == "head" else settings.epochs - settings.lp_epochs


def make_optimizer(
    model: Classifier,
    settings: FinetuneSettings,
    phase: str,
    steps_per_epoch: int,
    criterion: nn.Module | None = None,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimiser for `phase` and its schedule: linear warm-up, then cosine decay to zero.

    The criterion's own parameters (learned task weights) learn at the head's rate, undecayed.
    """
    groups = parameter_groups(model, settings, phase)
    learned = [p for p in criterion.parameters()] if criterion is not None else []
    if learned:
        groups.append({"params": learned, "lr": groups[-1]["lr"], "weight_decay": 0.0})
    for group in groups:
        group["initial_lr"] = group["lr"]
    if settings.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, momentum=settings.momentum, nesterov=True)
    else:
        optimizer = torch.optim.AdamW(groups)
    total = max(1, _phase_epochs(settings, phase) * steps_per_epoch)
    warmup = min(total - 1, int(settings.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
