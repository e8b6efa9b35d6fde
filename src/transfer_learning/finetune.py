"""Training a backbone + new head with PyTorch: parameter transfer and structure transfer.

Every epoch draws its randomness from (seed, epoch) alone and ends with an atomic checkpoint, so a
run killed mid-training and resumed ends exactly where an uninterrupted run ends.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2
from tqdm.auto import tqdm

from transfer_learning.backbones import Backbone, BackboneSettings, build_backbone
from transfer_learning.config import check_known_keys
from transfer_learning.datasets import write_atomically
from transfer_learning.extraction import (
    EvalCollate,
    ImageDataset,
    Normaliser,
    autocast_dtype,
    configure_cpu_threads,
    image_loader,
    resolve_num_workers,
)

logger = logging.getLogger(__name__)

STRATEGIES = ("linear_probe", "full", "lp_ft")


class TrainingError(RuntimeError):
    """Training cannot go on (bad settings, non-finite loss, out of memory)."""


@dataclass(frozen=True)
class FinetuneSettings:
    """The `finetune` block of parameters_parameter_transfer.yml / parameters_structure_transfer.yml."""

    init: str = "pretrained"  # pretrained | random (structure transfer)
    strategy: str = "full"  # linear_probe | full | lp_ft
    epochs: int = 10
    lp_epochs: int = 2  # lp_ft: epochs with the backbone frozen before unfreezing
    batch_size: int = 64
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    layer_decay: float | None = None  # e.g. 0.75: each earlier layer group learns 0.75x slower
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    class_weight: str | None = None  # null | balanced
    grad_clip: float | None = 1.0
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: bool = True
    patience: int | None = 5  # early stopping: epochs without a better val accuracy
    compile: bool = False  # torch.compile the model (GPU)
    resume: bool = False
    checkpoint_dir: str = "data/06_models/checkpoints"
    num_workers: int | str = "auto"
    progress: bool = True

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> FinetuneSettings:
        check_known_keys(cls, params, "finetune", TrainingError)
        values = dict(params)
        if "crop_scale" in values:
            values["crop_scale"] = tuple(values["crop_scale"])
        settings = cls(**values)
        checks = {
            "init": settings.init in ("pretrained", "random"),
            "strategy": settings.strategy in STRATEGIES,
            "optimizer": settings.optimizer in ("adamw", "sgd"),
            "epochs": isinstance(settings.epochs, int) and settings.epochs >= 1,
            "batch_size": isinstance(settings.batch_size, int) and settings.batch_size >= 1,
            "lr": settings.lr > 0,
            "class_weight": settings.class_weight in (None, "balanced"),
            "layer_decay": settings.layer_decay is None or 0 < settings.layer_decay <= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise TrainingError(
                f"finetune.{bad[0]}={getattr(settings, bad[0])!r} is not valid; see "
                "conf/base/parameters_parameter_transfer.yml for the allowed values."
            )
        return settings


class Classifier(nn.Module):
    """Backbone features → a new linear head sized to the task's classes."""

    def __init__(self, features: nn.Module, feature_dim: int, n_classes: int) -> None:
        super().__init__()
        self.features = features
        self.head = nn.Linear(feature_dim, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


@dataclass
class TrainingResult:
    state_dict: dict[str, torch.Tensor]
    best_epoch: int
    best_val_accuracy: float
    history: list[dict[str, float]]
    fit_seconds: float
    trainable_parameters: int
    images_per_second: float
    resumed_from_epoch: int = 0
    stopped_early: bool = False


def build_classifier(
    backbone_settings: BackboneSettings, settings: FinetuneSettings, n_classes: int, seed: int
) -> tuple[Classifier, Backbone]:
    """The registry's backbone (pretrained or random) with a fresh head for `n_classes`."""
    torch.manual_seed(seed)
    if settings.init == "random":
        backbone_settings = BackboneSettings(
            backbone_settings.name, backbone_settings.image_size, pretrained=False
        )
    backbone = build_backbone(backbone_settings)
    return Classifier(backbone.features, backbone.feature_dim, n_classes), backbone


def train_classifier(
    locations: tuple[Sequence[str], Sequence[str]],
    labels: tuple[np.ndarray, np.ndarray],
    n_classes: int,
    backbone_settings: BackboneSettings,
    settings: FinetuneSettings,
    seed: int,
    device: torch.device,
    run_name: str,
) -> TrainingResult:
    """Train on (train) and select the best epoch on (val); test data never comes here.

    `locations` and `labels` are (train, val) pairs. `run_name` keys the checkpoint folder.
    """
    if device.type == "cpu":
        configure_cpu_threads()
    model, backbone = build_classifier(backbone_settings, settings, n_classes, seed)
    model = model.to(device).to(memory_format=torch.channels_last)
    normalise = Normaliser(backbone.preprocessing).to(device)
    train_locations, val_locations = locations
    train_labels, val_labels = (torch.tensor(np.asarray(y), dtype=torch.long) for y in labels)
    # On CPU a training step is ~30x the cost of decoding its images, so decoding in the main
    # process wastes little and saves a worker start per epoch; GPUs need the workers.
    workers = (
        0
        if settings.num_workers == "auto" and device.type == "cpu"
        else resolve_num_workers(settings.num_workers, device)
    )
    size = backbone.preprocessing.image_size
    augment = v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=settings.crop_scale, antialias=True),
            *([v2.RandomHorizontalFlip()] if settings.hflip else []),
        ]
    )
    train_data = _Labelled(ImageDataset(train_locations, augment, min_size=size), train_labels)
    val_loader = image_loader(
        ImageDataset(val_locations, min_size=size),
        settings.batch_size,
        workers,
        device,
        collate_fn=EvalCollate(backbone.preprocessing),
    )
    criterion = nn.CrossEntropyLoss(
        weight=_class_weights(train_labels, n_classes, settings.class_weight),
        label_smoothing=settings.label_smoothing,
    ).to(device)
    steps_per_epoch = max(1, len(train_locations) // settings.batch_size)
    dtype = autocast_dtype(device)
    forward = torch.compile(model) if settings.compile else model

    checkpoint_path = Path(settings.checkpoint_dir) / run_name / "last.pt"
    fingerprint = _fingerprint(backbone_settings, settings, n_classes, seed, locations)
    state = _initial_state(model, settings)
    start_epoch, checkpoint = 0, None
    if settings.resume and checkpoint_path.exists():
        checkpoint = _load_checkpoint(checkpoint_path, fingerprint)
        model.load_state_dict(checkpoint["model"])
        state.update(checkpoint["state"])
        start_epoch = int(checkpoint["epoch"])
        logger.info("Resuming %s from the checkpoint after epoch %d", run_name, start_epoch)
    elif checkpoint_path.exists():
        checkpoint_path.unlink()  # a fresh run must not be resumed from an older one later
    optimizer, scheduler = _optimiser(model, settings, state["phase"], steps_per_epoch)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])

    started = time.perf_counter()
    trained_images = 0
    for epoch in range(start_epoch, settings.epochs):
        phase = _phase(settings, epoch)
        if phase != state["phase"]:
            state["phase"] = phase
            optimizer, scheduler = _optimiser(model, settings, phase, steps_per_epoch)
        _set_trainable(model, settings, phase)
        # Each epoch's shuffling, augmentation and dropout depend on (seed, epoch) only.
        torch.manual_seed(seed * 1000 + epoch)
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        loader = image_loader(
            train_data,
            settings.batch_size,
            workers,
            device,
            shuffle=True,
            generator=generator,
            drop_last=True,
        )
        epoch_start = time.perf_counter()
        train_loss = _train_one_epoch(
            forward,
            loader,
            normalise,
            criterion,
            optimizer,
            scheduler,
            settings,
            epoch,
            device,
            dtype,
        )
        train_seconds = time.perf_counter() - epoch_start
        trained_images += steps_per_epoch * settings.batch_size
        val_loss, val_accuracy = _validate(
            forward, val_loader, normalise, val_labels, criterion, device, dtype
        )
        record = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "lr": optimizer.param_groups[-1]["lr"],
            "train_images_per_second": steps_per_epoch * settings.batch_size / train_seconds,
        }
        state["history"].append(record)
        logger.info(
            "%s epoch %d/%d: train loss %.4f, val loss %.4f, val accuracy %.4f",
            run_name,
            epoch + 1,
            settings.epochs,
            train_loss,
            val_loss,
            val_accuracy,
        )
        if val_accuracy > state["best_val_accuracy"]:
            state.update(
                best_val_accuracy=val_accuracy,
                best_epoch=epoch + 1,
                best_state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                epochs_without_improvement=0,
            )
        else:
            state["epochs_without_improvement"] += 1
        _save_checkpoint(
            checkpoint_path, fingerprint, epoch + 1, model, optimizer, scheduler, state
        )
        if (
            settings.patience is not None
            and state["epochs_without_improvement"] >= settings.patience
        ):
            logger.info(
                "%s: no better val accuracy for %d epochs, stopping", run_name, settings.patience
            )
            state["stopped_early"] = True
            break
    seconds = time.perf_counter() - started
    return TrainingResult(
        state_dict=state["best_state"],
        best_epoch=state["best_epoch"],
        best_val_accuracy=state["best_val_accuracy"],
        history=state["history"],
        fit_seconds=seconds,
        trainable_parameters=_trainable_count(model, settings),
        images_per_second=trained_images / seconds if seconds else 0.0,
        resumed_from_epoch=start_epoch,
        stopped_early=state.get("stopped_early", False),
    )


class _Labelled(torch.utils.data.Dataset):
    def __init__(self, images: ImageDataset, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[position], self.labels[position]


def _class_weights(labels: torch.Tensor, n_classes: int, mode: str | None) -> torch.Tensor | None:
    if mode != "balanced":
        return None
    counts = torch.bincount(labels, minlength=n_classes).clamp(min=1).float()
    return counts.sum() / (n_classes * counts)


def _phase(settings: FinetuneSettings, epoch: int) -> str:
    if settings.strategy == "linear_probe":
        return "head"
    if settings.strategy == "lp_ft" and epoch < settings.lp_epochs:
        return "head"
    return "all"


def _set_trainable(model: Classifier, settings: FinetuneSettings, phase: str) -> None:
    frozen = phase == "head"
    model.features.requires_grad_(not frozen)
    model.head.requires_grad_(True)
    model.train()
    if frozen:
        # A frozen backbone keeps its BatchNorm statistics too (eval mode).
        model.features.eval()


def _trainable_count(model: Classifier, settings: FinetuneSettings) -> int:
    modules = [model.head] if settings.strategy == "linear_probe" else [model]
    return sum(p.numel() for module in modules for p in module.parameters())


def _layer_groups(
    model: Classifier, settings: FinetuneSettings, phase: str
) -> list[dict[str, Any]]:
    """Parameter groups; with layer_decay, earlier layers (by depth order) get smaller rates."""
    if phase == "head":
        return [{"params": list(model.head.parameters()), "lr": settings.lr}]
    depth_of: dict[str, int] = {}
    grouped: dict[int, list[nn.Parameter]] = {}
    for name, parameter in model.features.named_parameters():
        key = ".".join(name.split(".")[:2])  # e.g. "blocks.3", "conv_stem", "layer2.1"
        depth = depth_of.setdefault(key, len(depth_of))
        grouped.setdefault(depth, []).append(parameter)
    head_depth = len(depth_of)
    grouped[head_depth] = list(model.head.parameters())
    decay = settings.layer_decay or 1.0
    return [
        {"params": params, "lr": settings.lr * decay ** (head_depth - depth)}
        for depth, params in sorted(grouped.items())
    ]


def _optimiser(model: Classifier, settings: FinetuneSettings, phase: str, steps_per_epoch: int):
    groups = _layer_groups(model, settings, phase)
    for group in groups:
        group["initial_lr"] = group["lr"]
    if settings.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            groups, momentum=settings.momentum, weight_decay=settings.weight_decay, nesterov=True
        )
    else:
        optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    epochs = (
        settings.lp_epochs
        if (settings.strategy == "lp_ft" and phase == "head")
        else (
            settings.epochs - settings.lp_epochs
            if settings.strategy == "lp_ft"
            else settings.epochs
        )
    )
    total = max(1, epochs * steps_per_epoch)
    warmup = min(total - 1, int(settings.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        # Linear warm-up, then cosine decay to zero.
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _train_one_epoch(
    model, loader, normalise, criterion, optimizer, scheduler, settings, epoch, device, dtype
) -> float:
    total, count = 0.0, 0
    progress = tqdm(
        loader,
        desc=f"epoch {epoch + 1}/{settings.epochs}",
        unit="batch",
        disable=None if settings.progress else True,  # None: shown on a terminal only
        leave=False,
    )
    with progress as bar:
        for step, (images, targets) in enumerate(bar):
            targets = targets.to(device, non_blocking=True)
            try:
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    loss = criterion(model(normalise(images)), targets)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"Non-finite loss ({loss.item()}) at epoch {epoch + 1}, step {step + 1}, "
                        f"learning rate {optimizer.param_groups[-1]['lr']:.3g}: lower finetune.lr "
                        "or set finetune.grad_clip."
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if settings.grad_clip:
                    nn.utils.clip_grad_norm_(
                        [p for g in optimizer.param_groups for p in g["params"]], settings.grad_clip
                    )
                optimizer.step()
                scheduler.step()
            except torch.cuda.OutOfMemoryError as error:
                raise TrainingError(
                    f"CUDA ran out of memory at epoch {epoch + 1} with finetune.batch_size="
                    f"{settings.batch_size}; lower it (e.g. finetune.batch_size={max(1, settings.batch_size // 2)})."
                ) from error
            total += loss.item() * len(targets)
            count += len(targets)
            bar.set_postfix(loss=f"{total / count:.4f}")
    return total / max(count, 1)


@torch.inference_mode()
def _validate(model, loader, normalise, labels, criterion, device, dtype) -> tuple[float, float]:
    model.eval()
    logits = predict_logits(model, loader, normalise, device, dtype)
    loss = float(
        nn.functional.cross_entropy(logits, labels, label_smoothing=criterion.label_smoothing)
    )
    accuracy = float((logits.argmax(1) == labels).float().mean())
    return loss, accuracy


@torch.inference_mode()
def predict_logits(model, loader, normalise, device, dtype) -> torch.Tensor:
    """Logits for every batch of `loader`, in order, as a float32 CPU tensor."""
    model.eval()
    outputs = []
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for images in loader:
            outputs.append(model(normalise(images)).float().cpu())
    return torch.cat(outputs)


def predict_probabilities(
    model: Classifier,
    locations: Sequence[str],
    backbone: Backbone,
    batch_size: int,
    device: torch.device,
) -> np.ndarray:
    """Softmax class probabilities with the deterministic evaluation transform."""
    model = model.to(device).to(memory_format=torch.channels_last).eval()
    loader = image_loader(
        ImageDataset(locations, min_size=backbone.preprocessing.image_size),
        batch_size,
        resolve_num_workers("auto", device),
        device,
        collate_fn=EvalCollate(backbone.preprocessing),
    )
    normalise = Normaliser(backbone.preprocessing).to(device)
    logits = predict_logits(model, loader, normalise, device, autocast_dtype(device))
    probabilities = torch.softmax(logits.double(), dim=1).numpy()
    return probabilities / probabilities.sum(axis=1, keepdims=True)


# ---- checkpoints -----------------------------------------------------------------------------


def _initial_state(model: Classifier, settings: FinetuneSettings) -> dict[str, Any]:
    return {
        "phase": _phase(settings, 0),
        "history": [],
        "best_val_accuracy": -1.0,
        "best_epoch": 0,
        "best_state": copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()}),
        "epochs_without_improvement": 0,
    }


def _fingerprint(backbone_settings, settings, n_classes, seed, locations) -> str:
    relevant = {
        k: v for k, v in asdict(settings).items() if k not in ("resume", "progress", "num_workers")
    }
    digest = hashlib.sha256(
        json.dumps(
            [asdict(backbone_settings), relevant, n_classes, seed], sort_keys=True, default=str
        ).encode()
    )
    for group in locations:
        for location in group:
            digest.update(location.encode())
    return digest.hexdigest()


def _save_checkpoint(path: Path, fingerprint, epoch, model, optimizer, scheduler, state) -> None:
    """Write the checkpoint atomically: a kill mid-write never leaves half a file."""
    checkpoint = {
        "fingerprint": fingerprint,
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "state": dict(state),
    }
    write_atomically(path, lambda stream: torch.save(checkpoint, stream))


def _load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint["fingerprint"] != fingerprint:
        raise TrainingError(
            f"The checkpoint {path} was written by a run with other data or settings; "
            "resume only the same run, or set finetune.resume=false to start afresh."
        )
    return checkpoint
