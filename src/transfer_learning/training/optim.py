"""What trains and how fast: phases (linear probe, all), parameter groups, optimiser and schedule."""

from __future__ import annotations

import math
from collections.abc import Sequence
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


def set_trainable(model: Classifier, phase: str, frozen_layers: Sequence[str] = ()) -> None:
    """Gradients and training mode for `phase`; `frozen_layers` (see `early_layers`) stay as
    they are in the 'all' phase too. Frozen layers keep their BatchNorm statistics (eval mode)."""
    frozen = phase == "head"
    model.features.requires_grad_(not frozen)
    model.head.requires_grad_(True)
    model.train()
    if frozen:
        model.features.eval()
        return
    for name in frozen_layers:
        layer = model.features.get_submodule(name)
        layer.requires_grad_(False)
        layer.eval()


def early_layers(features: nn.Module, image_size: int, max_stride: int | None) -> list[str]:
    """The leading layer groups of `features` (the depth groups of `parameter_groups`: e.g.
    conv_stem, bn1, blocks.0, blocks.1 of EfficientNet; conv1, bn1, layer1.0 … of ResNet) whose
    every output is at most `max_stride` times smaller than the image; none for None.

    Found by one forward pass of a blank image, so it holds for any convolutional network; a
    network whose first layer already leaves the image grid (a vision transformer's patch
    embedding at stride 16, tokens) has none at stride 4.
    """
    if not max_stride:
        return []
    fine: dict[str, bool] = {}  # group → every output it made was at most max_stride smaller

    def record(group: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            on_grid = isinstance(output, torch.Tensor) and output.ndim == 4
            fine_enough = on_grid and output.shape[-1] * max_stride >= image_size
            fine[group] = fine.get(group, True) and fine_enough

        return hook

    hooks = [
        module.register_forward_hook(record(_depth_group(name)))
        for name, module in features.named_modules()
        if name
    ]
    was_training = features.training
    parameter = next(features.parameters())
    blank = torch.zeros(1, 3, image_size, image_size, device=parameter.device)
    try:
        with torch.no_grad():
            features.eval()(blank)
    finally:
        for hook in hooks:
            hook.remove()
        features.train(was_training)
    groups = dict.fromkeys(_depth_of_parameter(name) for name, _ in features.named_parameters())
    leading = []
    for group in groups:
        if not fine.get(group, False):
            break
        leading.append(group)
    return leading


def _depth_group(layer: str) -> str:
    """A layer's depth group: its first two name parts (conv_stem, bn1, blocks.3, layer2.1)."""
    return ".".join(layer.split(".")[:2])


def _depth_of_parameter(name: str) -> str:
    """The depth group of the layer a parameter belongs to ('' for the network's own)."""
    return _depth_group(name.rpartition(".")[0])


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameter_groups(
    model: Classifier, settings: FinetuneSettings, phase: str
) -> list[dict[str, Any]]:
    """Optimiser groups: one rate per depth (with layer_decay, earlier layers learn slower), and
    in each depth weight decay on ≥2-D tensors only — biases and normalisation weights are 1-D
    and are not decayed (as timm does). Frozen parameters (no gradient: see `set_trainable`)
    are left out."""
    by_depth: dict[int, list[nn.Parameter]] = {}
    depth_of: dict[str, int] = {}
    if phase != "head":
        for name, parameter in model.features.named_parameters():
            depth = depth_of.setdefault(_depth_of_parameter(name), len(depth_of))
            if parameter.requires_grad:
                by_depth.setdefault(depth, []).append(parameter)
    head_depth = len(depth_of)
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
