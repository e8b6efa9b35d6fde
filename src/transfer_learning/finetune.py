"""Training a backbone + new head with PyTorch: parameter transfer and structure transfer.

Every epoch draws its randomness from (seed, epoch) alone and ends with an atomic checkpoint, so a
run killed mid-training and resumed ends exactly where an uninterrupted run ends.

The parts, in the order `train_classifier` uses them: the settings (`Recipe`: what decides the
weights; `TrainingRunSettings`: how to run), `build_classifier`, `TrainingData` (the loaders),
`make_optimizer`, `Trainer` (one epoch, validation), `TrainingState` and `Checkpointer`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2
from tqdm.auto import tqdm

from transfer_learning.backbones import (
    AUTO,
    Backbone,
    BackboneError,
    BackboneSettings,
    build_backbone,
    resolve_image_size,
)
from transfer_learning.config import check_known_keys, require_known_keys, with_overrides
from transfer_learning.distributed import (
    SINGLE_PROCESS,
    DistributedSettings,
    ProcessContext,
    contiguous_shard,
    gather_in_rank_order,
    launch,
    sum_over_ranks,
    synchronise_batchnorm,
)
from transfer_learning.extraction import (
    EvalCollate,
    ImageDataset,
    Normaliser,
    autocast_dtype,
    cpu_threads,
    image_loader,
    resolve_num_workers,
)
from transfer_learning.files import write_atomically
from transfer_learning.tasks import MISSING, Tasks

logger = logging.getLogger(__name__)

MODES = ("linear_probe", "full", "lp_ft")
LOSSES = ("cross_entropy", "logit_adjusted", "balanced_softmax")
SAMPLINGS = ("uniform", "class_balanced")
TASK_WEIGHTS = ("equal", "uncertainty")
# `epochs: auto` bounds: every image is seen a few times; tiny sets do not loop for ever.
MIN_AUTO_EPOCHS = 3
MAX_AUTO_EPOCHS = 60
MIN_AUTO_PATIENCE = 3


class TrainingError(RuntimeError):
    """Training cannot go on (bad settings, non-finite loss, out of memory)."""


# ---- settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneSettings:
    """The `finetune` recipe (parameters_parameter_transfer.yml): everything that decides the weights."""

    mode: str = "full"  # linear_probe | full | lp_ft
    epochs: int | str = AUTO  # auto: as many as `steps` optimiser steps need (see resolve)
    steps: int = 200  # the step budget that `epochs: auto` aims for
    lp_epochs: int = 2  # lp_ft: epochs with the backbone frozen before unfreezing
    batch_size: int | str = AUTO  # auto: from the number of training images
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.05  # on weight matrices and kernels only; never on biases or norms
    momentum: float = 0.9
    layer_decay: float | None = None  # e.g. 0.75: each earlier layer group learns 0.75x slower
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    class_weight: str | None = None  # null | balanced
    # Long-tailed classes: logit_adjusted adds τ·log(class prior) to the logits in training only
    # (Menon et al. 2021); balanced_softmax is the same with τ = 1 (Ren et al. 2020).
    loss: str = "cross_entropy"  # cross_entropy | logit_adjusted | balanced_softmax
    logit_adjustment_tau: float = 1.0
    sampling: str = "uniform"  # uniform | class_balanced (every class drawn equally often)
    mixup: float = 0.0  # Beta(α, α) of mixup; 0: off
    cutmix: float = 0.0  # Beta(α, α) of cutmix; 0: off (both on: one of the two per batch)
    grad_clip: float | None = 1.0
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: bool | str = AUTO  # auto: when the data source is mirror-symmetric (photos)
    patience: int | str | None = AUTO  # early stopping: epochs without a better val accuracy
    # Several label columns: each task's loss weighs 1 (equal), or exp(-s) with a learned log
    # variance s per task (uncertainty, Kendall et al. 2018).
    task_weights: str = "equal"

    @classmethod
    def from_params(cls, params: Mapping[str, Any], block: str = "finetune") -> FinetuneSettings:
        check_known_keys(cls, params, block, TrainingError)
        values = dict(params)
        if "crop_scale" in values:
            values["crop_scale"] = tuple(values["crop_scale"])
        settings = cls(**values)
        checks = {
            "mode": settings.mode in MODES,
            "optimizer": settings.optimizer in ("adamw", "sgd"),
            "epochs": _auto_or_positive(settings.epochs),
            "steps": _positive_int(settings.steps),
            "batch_size": _auto_or_positive(settings.batch_size),
            "hflip": settings.hflip in (True, False, AUTO),
            "patience": settings.patience is None or _auto_or_positive(settings.patience),
            "lr": settings.lr > 0,
            "class_weight": settings.class_weight in (None, "balanced"),
            "loss": settings.loss in LOSSES,
            "logit_adjustment_tau": _non_negative(settings.logit_adjustment_tau),
            "sampling": settings.sampling in SAMPLINGS,
            "mixup": _non_negative(settings.mixup),
            "cutmix": _non_negative(settings.cutmix),
            "layer_decay": settings.layer_decay is None or 0 < settings.layer_decay <= 1,
            "task_weights": settings.task_weights in TASK_WEIGHTS,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise TrainingError(
                f"{block}.{bad[0]}={getattr(settings, bad[0])!r} is not valid; see "
                "conf/base/parameters_parameter_transfer.yml for the allowed values."
            )
        return settings

    def resolve(self, n_train: int, mirror_symmetric: bool) -> FinetuneSettings:
        """The recipe with every `auto` replaced: batch size and epochs from the number of
        training images (a budget in optimiser steps, not epochs), flips from the data's symmetry.

        Small data sets get small batches and as many epochs as `steps` updates need (capped at
        MAX_AUTO_EPOCHS); large ones get at least MIN_AUTO_EPOCHS passes and no more than
        the budget asks for.
        """
        batch_size = self.batch_size
        if batch_size == AUTO:
            batch_size = auto_batch_size(n_train)
        if batch_size > n_train:
            # A batch larger than the training set would leave no full batch to train on.
            if self.batch_size != AUTO:
                logger.warning(
                    "finetune.batch_size=%s exceeds the %d training images; using %d",
                    self.batch_size,
                    n_train,
                    n_train,
                )
            batch_size = max(1, n_train)
        epochs = self.epochs
        if epochs == AUTO:
            steps_per_epoch = max(1, n_train // batch_size)
            epochs = min(
                MAX_AUTO_EPOCHS, max(MIN_AUTO_EPOCHS, math.ceil(self.steps / steps_per_epoch))
            )
        hflip = mirror_symmetric if self.hflip == AUTO else self.hflip
        patience = self.patience
        if patience == AUTO:
            # A third of the schedule: stopping sooner would cut the cosine decay short on the
            # noisy val of a small data set (20 photos a class stopped after 40 of 200 steps).
            patience = max(MIN_AUTO_PATIENCE, math.ceil(epochs / 3))
        return replace(self, batch_size=batch_size, epochs=epochs, hflip=hflip, patience=patience)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _non_negative(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def _auto_or_positive(value: Any) -> bool:
    return value == AUTO or _positive_int(value)


def auto_batch_size(n_train: int) -> int:
    """A power of two near n_train / 16 (at least 16 steps an epoch), between 16 and 64."""
    return int(min(64, max(16, 2 ** math.floor(math.log2(max(1, n_train / 16))))))


@dataclass(frozen=True)
class TrainingRunSettings:
    """The `training` block: how a training run is carried out, never what it learns."""

    resume: bool = False
    checkpoint_dir: str = "data/06_models/checkpoints"
    num_workers: int | str = "auto"
    progress: bool = True
    compile: bool = False  # torch.compile the model (GPU)
    # Gradient accumulation: a process's share of a batch runs in pieces of at most this many
    # images (when the batch does not fit in memory); None: all at once.
    micro_batch_size: int | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> TrainingRunSettings:
        check_known_keys(cls, params, "training", TrainingError)
        settings = cls(**params)
        if settings.micro_batch_size is not None and not _positive_int(settings.micro_batch_size):
            raise TrainingError(
                f"training.micro_batch_size={settings.micro_batch_size!r} must be null or an "
                "integer ≥ 1."
            )
        return settings


@dataclass(frozen=True)
class Recipe:
    """One strategy's network and fine-tuning recipe: the shared blocks with its overrides."""

    backbone: BackboneSettings
    finetune: FinetuneSettings

    @classmethod
    def from_params(
        cls,
        backbone: Mapping[str, Any],
        finetune: Mapping[str, Any],
        overrides: Mapping[str, Any] | None,
        strategy: str,
    ) -> Recipe:
        """`overrides` is the `<strategy>` block: its own `backbone` and `finetune` keys.

        `auto` values stay as they are: `resolve` replaces them from the data profile.
        """
        overrides = overrides or {}
        require_known_keys(overrides, ["backbone", "finetune"], strategy, TrainingError)
        backbone_blocks = ("backbone", f"{strategy}.backbone")
        merged_backbone = with_overrides(
            BackboneSettings, backbone, overrides.get("backbone"), backbone_blocks, BackboneError
        )
        finetune_blocks = ("finetune", f"{strategy}.finetune")
        merged_finetune = with_overrides(
            FinetuneSettings, finetune, overrides.get("finetune"), finetune_blocks, TrainingError
        )
        return cls(
            BackboneSettings.from_params(merged_backbone, block=backbone_blocks[1]),
            FinetuneSettings.from_params(merged_finetune, block=finetune_blocks[1]),
        )

    def resolve(self, data_profile: Mapping[str, Any]) -> Recipe:
        """Every `auto` replaced by a value from the data profile (see `image_index.profile_images`)."""
        return Recipe(
            resolve_image_size(self.backbone, data_profile["typical_short_side"]),
            self.finetune.resolve(data_profile["n_train"], data_profile["mirror_symmetric"]),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"backbone": asdict(self.backbone), "finetune": asdict(self.finetune)}


@dataclass(frozen=True)
class TrainValImages:
    """Where the train and val images are and their labels; test images never come here.

    Labels are one id per image, or with several tasks one column per task (`tasks.MISSING`
    where an image has no label for a task).
    """

    train_locations: Sequence[str]
    train_labels: np.ndarray
    val_locations: Sequence[str]
    val_labels: np.ndarray

    @classmethod
    def from_index(
        cls, train: pd.DataFrame, val: pd.DataFrame, tasks: Tasks | None = None
    ) -> TrainValImages:
        """From image-index rows (`location`, `label`, and each task's `label:<task>` when
        `tasks` has several) of the train and val splits."""
        if tasks is not None and tasks.multi:
            labels = tasks.label_matrix(train), tasks.label_matrix(val)
        else:
            labels = train["label"].to_numpy(), val["label"].to_numpy()
        return cls(train["location"].tolist(), labels[0], val["location"].tolist(), labels[1])


# ---- the network -----------------------------------------------------------------------------


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


# ---- data ------------------------------------------------------------------------------------


class LabelledImages(Dataset):
    """Images with their labels: (uint8 image, label) pairs."""

    def __init__(self, images: ImageDataset, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """`item`: a position, or (position, augmentation seed) as `EpochOrder` draws them.

        A seeded draw is augmented the same whichever process or worker decodes it: one
        process and N distributed ones see the same crops.
        """
        if isinstance(item, tuple):
            item, seed = item
            # Reseeding the CPU generator costs 1 µs, a fork_rng around it 125 µs an image;
            # training runs on a forked RNG (`isolated_randomness_and_threads`), so the
            # caller's state is untouched either way.
            torch.default_generator.manual_seed(seed)
        return self.images[item], self.labels[item]


class EpochOrder(Sampler[list[tuple[int, int]]]):
    """One process's batches of an epoch: lists of (image position, augmentation seed).

    The epoch's order depends on its seed alone (a shuffle, or class-balanced draws with
    replacement), is cut to whole global batches, and global batch k is split over the
    processes by position (as torch's DistributedSampler interleaves): the N processes'
    step k together hold exactly the images one process's step k holds.
    """

    def __init__(
        self,
        n_images: int,
        global_batch: int,
        epoch_seed: int,
        context: ProcessContext,
        draw_weights: torch.Tensor | None = None,
    ) -> None:
        self.n_images, self.global_batch, self.epoch_seed = n_images, global_batch, epoch_seed
        self.rank, self.world_size = context.rank, context.world_size
        self.draw_weights = draw_weights

    def __len__(self) -> int:
        return self.n_images // self.global_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(self.epoch_seed)
        if self.draw_weights is None:
            order = torch.randperm(self.n_images, generator=generator)
        else:
            order = torch.multinomial(
                self.draw_weights, self.n_images, replacement=True, generator=generator
            )
        order = order.tolist()
        for step in range(len(self)):
            first = step * self.global_batch
            positions = range(first + self.rank, first + self.global_batch, self.world_size)
            yield [(order[p], self._augmentation_seed(p)) for p in positions]

    def _augmentation_seed(self, position: int) -> int:
        return (self.epoch_seed * 2**32 + position) % 2**63


@dataclass
class TrainingData:
    """The augmented train set (a new loader per epoch) and this process's share of val."""

    train: Dataset
    val_loader: DataLoader
    val_labels: torch.Tensor  # all of val's labels (every process gathers all val logits)
    train_labels: torch.Tensor
    batch_size: int  # the global batch: the images of one optimiser step over all processes
    workers: int
    device: torch.device
    sampling: str = "uniform"
    context: ProcessContext | None = None  # None: one process

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.train) // self.batch_size)

    def train_loader(self, epoch_seed: int) -> DataLoader:
        """This process's batches, drawn by `EpochOrder` from a seed for this epoch alone
        (resume relies on it).

        `class_balanced`: each draw picks a class uniformly, then one of its images (with
        replacement), so an epoch of the same length sees every class about equally often.
        """
        weights = None
        if self.sampling == "class_balanced":
            counts = torch.bincount(self.train_labels).double()
            weights = (1.0 / counts)[self.train_labels]
        order = EpochOrder(
            len(self.train),
            self.batch_size,
            epoch_seed,
            self.context or ProcessContext(0, 1, self.device),
            weights,
        )
        return image_loader(self.train, None, self.workers, self.device, batch_sampler=order)


def train_augmentation(settings: FinetuneSettings, size: int) -> v2.Compose:
    """Random resized crops (and flips when the recipe has them) to `size` px, on uint8 images."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=settings.crop_scale, antialias=True),
            *([v2.RandomHorizontalFlip()] if settings.hflip else []),
        ]
    )


def build_training_data(
    images: TrainValImages,
    backbone: Backbone,
    settings: FinetuneSettings,
    run: TrainingRunSettings,
    context: ProcessContext,
) -> TrainingData:
    """The loaders of one process: its share of every training batch, its slice of val."""
    device = context.device
    # On CPU a training step is ~30x the cost of decoding its images, so decoding in the main
    # process wastes little and saves a worker start per epoch; GPUs need the workers.
    workers = (
        0
        if run.num_workers == "auto" and device.type == "cpu"
        else resolve_num_workers(run.num_workers, device)
    )
    size = backbone.preprocessing.image_size
    augment = train_augmentation(settings, size)
    train_labels = torch.tensor(np.asarray(images.train_labels), dtype=torch.long)
    val_slice = contiguous_shard(len(images.val_locations), context)
    val_loader = image_loader(
        ImageDataset([images.val_locations[i] for i in val_slice], min_size=size),
        settings.batch_size,
        workers,
        device,
        collate_fn=EvalCollate(backbone.preprocessing),
    )
    return TrainingData(
        train=LabelledImages(
            ImageDataset(images.train_locations, augment, min_size=size), train_labels
        ),
        val_loader=val_loader,
        val_labels=torch.tensor(np.asarray(images.val_labels), dtype=torch.long),
        train_labels=train_labels,
        batch_size=settings.batch_size,
        workers=workers,
        device=device,
        sampling=settings.sampling,
        context=context,
    )


# ---- optimiser -------------------------------------------------------------------------------


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


# ---- one epoch -------------------------------------------------------------------------------


@dataclass
class Trainer:
    """Runs the steps of an epoch and the validation pass of one model in one process."""

    model: nn.Module  # the network as called in training: DDP-wrapped, torch.compile'd when asked
    eval_model: nn.Module  # the same weights, called alone (validation is not synchronised)
    normalise: Normaliser
    criterion: TrainingLoss
    context: ProcessContext
    grad_clip: float | None
    batch_size: int  # the global batch
    progress: bool
    mix: nn.Module | None = None  # mixup / cutmix of each training batch
    micro_batch_size: int | None = None

    @property
    def device(self) -> torch.device:
        return self.context.device

    @property
    def dtype(self) -> torch.dtype | None:
        return autocast_dtype(self.device)

    def train_epoch(self, loader: DataLoader, optimizer, scheduler, description: str) -> float:
        """One pass over `loader`; returns the mean training loss over all processes."""
        total, count = 0.0, 0
        hidden = self._hidden() or not self.context.is_main
        bar = tqdm(loader, desc=description, unit="batch", leave=False, disable=hidden)
        with bar:
            for step, (images, targets) in enumerate(bar):
                targets = targets.to(self.device, non_blocking=True)
                loss = self._step(
                    images, targets, optimizer, scheduler, f"{description}, step {step + 1}"
                )
                total += loss * len(targets)
                count += len(targets)
                bar.set_postfix(loss=f"{total / count:.4f}")
        total, count = sum_over_ranks(self.context, [total, count])
        return total / max(count, 1)

    def _step(self, images, targets, optimizer, scheduler, where: str) -> float:
        try:
            inputs = self.normalise(images)
            if self.mix is not None:
                inputs, targets = self.mix(inputs, targets)  # targets become class probabilities
            # This process's part of the global batch's mean loss: DDP averages gradients over
            # the processes, so each weighs its images by (its images × processes / batch).
            share = len(targets) * self.context.world_size / self.batch_size
            optimizer.zero_grad(set_to_none=True)
            pieces = _micro_batches(len(targets), self.micro_batch_size)
            total = 0.0
            for number, piece in enumerate(pieces):
                # Gradients are synchronised once, on the last piece (accumulation).
                last = number == len(pieces) - 1
                sync = (
                    nullcontext() if last or not self.context.distributed else self.model.no_sync()
                )
                with sync:
                    with torch.autocast(
                        self.device.type, dtype=self.dtype, enabled=self.dtype is not None
                    ):
                        loss = self.criterion(self.model(inputs[piece]), targets[piece])
                    if not torch.isfinite(loss):
                        raise TrainingError(
                            f"Non-finite loss ({loss.item()}) at {where}, learning rate "
                            f"{optimizer.param_groups[-1]['lr']:.3g}: lower finetune.lr or set "
                            "finetune.grad_clip."
                        )
                    weight = share * (piece.stop - piece.start) / len(targets)
                    (loss * weight).backward()  # weight 1 with one process: exact
                total += loss.item() * (piece.stop - piece.start)
            if self.context.distributed:
                # The learned task weights live outside the DDP module: average them as DDP does.
                for parameter in self.criterion.parameters():
                    if parameter.grad is not None:
                        torch.distributed.all_reduce(parameter.grad)
                        parameter.grad /= self.context.world_size
            if self.grad_clip:
                parameters = [p for group in optimizer.param_groups for p in group["params"]]
                nn.utils.clip_grad_norm_(parameters, self.grad_clip)
            optimizer.step()
            scheduler.step()
        except torch.cuda.OutOfMemoryError as error:
            pieces = self.micro_batch_size or max(1, self.batch_size // self.context.world_size)
            raise TrainingError(
                f"CUDA ran out of memory at {where} with finetune.batch_size={self.batch_size} "
                f"({pieces} images at a time in each process); set training.micro_batch_size="
                f"{max(1, pieces // 2)} to accumulate gradients over smaller pieces (the "
                "recipe stays the same)."
            ) from error
        return total / len(targets)

    @torch.inference_mode()
    def validate(self, loader: DataLoader, labels: torch.Tensor) -> tuple[float, list[float]]:
        """(val loss with the training criterion's smoothing, val accuracy of every task) over
        all of val: each process scores its slice, the logits are gathered in order.

        With several tasks, each task's loss and accuracy are over the images with its label,
        and the loss is their mean.
        """
        self.eval_model.eval()
        sizes = self.criterion.task_sizes
        outputs = [torch.empty(0, sum(sizes))]
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            for images in loader:
                outputs.append(self.eval_model(self.normalise(images)).float().cpu())
        logits = torch.cat(gather_in_rank_order(self.context, torch.cat(outputs)))
        smoothing = self.criterion.label_smoothing
        labels = labels.reshape(len(labels), -1)
        losses, accuracies = [], []
        for task, part in enumerate(logits.split(sizes, 1)):
            labelled = labels[:, task] != MISSING
            if not labelled.any():  # a given val split may lack a task: it cannot select
                losses.append(float("nan"))
                accuracies.append(float("nan"))
                continue
            target = labels[labelled, task]
            losses.append(
                float(
                    nn.functional.cross_entropy(part[labelled], target, label_smoothing=smoothing)
                )
            )
            accuracies.append(float((part[labelled].argmax(1) == target).float().mean()))
        return float(np.nanmean(losses)), accuracies

    def _hidden(self) -> bool | None:
        return None if self.progress else True  # None: shown on a terminal only


def _micro_batches(n_images: int, micro_batch_size: int | None) -> list[slice]:
    size = micro_batch_size or n_images
    return [slice(first, min(first + size, n_images)) for first in range(0, n_images, size)]


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


def build_trainer(
    model: Classifier,
    backbone: Backbone,
    data: TrainingData,
    recipe: FinetuneSettings,
    run: TrainingRunSettings,
    context: ProcessContext,
    criterion: TrainingLoss | MultiTaskLoss,
) -> Trainer:
    """The trainer of `model` in this process (call `set_trainable` first: DDP synchronises
    the parameters that require gradients when it wraps the model). `criterion`: the training
    loss, which may carry parameters (learned task weights) and persists across phases."""
    network = network_as_called(model, run, context)
    return Trainer(
        model=network,
        eval_model=model if context.distributed else network,
        normalise=Normaliser(backbone.preprocessing).to(context.device),
        criterion=criterion.to(context.device),
        context=context,
        grad_clip=recipe.grad_clip,
        batch_size=recipe.batch_size,
        progress=run.progress,
        # Mixing acts on one labelling: a multi-task criterion has none to mix (refused earlier).
        mix=batch_mixing(recipe, criterion.task_sizes[0])
        if isinstance(criterion, TrainingLoss)
        else None,
        micro_batch_size=run.micro_batch_size,
    )


def network_as_called(model: Classifier, run: TrainingRunSettings, context: ProcessContext):
    """`model` wrapped for training: DDP over the processes (when several), then compiled."""
    network: nn.Module = model
    if context.distributed:
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        network = DistributedDataParallel(model, device_ids=device_ids)
    return torch.compile(network) if run.compile else network


# ---- state and checkpoints -------------------------------------------------------------------


def _cpu_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}


@dataclass
class TrainingState:
    """Everything the epoch loop carries from one epoch to the next (and a resume restores)."""

    phase: str
    best_state: dict[str, torch.Tensor]
    history: list[dict[str, float]] = field(default_factory=list)
    best_val_accuracy: float = -1.0
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    stopped_early: bool = False

    def record(self, epoch_record: dict[str, float], model: nn.Module) -> None:
        """Append the epoch; keep the model's weights if its val accuracy is the best so far."""
        self.history.append(epoch_record)
        if epoch_record["val_accuracy"] > self.best_val_accuracy:
            self.best_val_accuracy = epoch_record["val_accuracy"]
            self.best_epoch = int(epoch_record["epoch"])
            self.best_state = _cpu_copy(model)
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1

    def out_of_patience(self, patience: int | None) -> bool:
        return patience is not None and self.epochs_without_improvement >= patience


def fingerprint(recipe: Recipe, n_classes: int, seed: int, images: TrainValImages) -> str:
    """A digest of everything that decides the trained weights: a resume must match it."""
    digest = hashlib.sha256(
        json.dumps([recipe.to_dict(), n_classes, seed], sort_keys=True, default=str).encode()
    )
    for location in [*images.train_locations, *images.val_locations]:
        digest.update(location.encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Checkpointer:
    """The last epoch's checkpoint of one run, written atomically after every epoch."""

    path: Path
    fingerprint: str
    writes: bool = True  # False in processes other than rank 0: they only read

    def restore(self, resume: bool) -> dict[str, Any] | None:
        """The checkpoint to resume from, or None; a fresh run deletes an older run's checkpoint."""
        if not self.path.exists():
            return None
        if not resume:
            if self.writes:
                self.path.unlink()  # a fresh run must not be resumed from an older one later
            return None
        checkpoint = torch.load(self.path, map_location="cpu", weights_only=True)
        if checkpoint["fingerprint"] != self.fingerprint:
            raise TrainingError(
                f"The checkpoint {self.path} was written by a run with other data or settings; "
                "resume only the same run, or set training.resume=false to start afresh."
            )
        return checkpoint

    def save(  # noqa: PLR0913 (everything a resume restores)
        self, epoch: int, model, criterion, optimizer, scheduler, state: TrainingState
    ) -> None:
        if not self.writes:
            return
        checkpoint = {
            "fingerprint": self.fingerprint,
            "epoch": epoch,
            "model": model.state_dict(),
            "criterion": criterion.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "state": asdict(state),
        }
        write_atomically(self.path, lambda stream: torch.save(checkpoint, stream))


# ---- the epoch loop --------------------------------------------------------------------------


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
    task_weights: list[float] | None = None  # several tasks: each task's loss weight at the end


def epoch_seed(seed: int, epoch: int) -> int:
    """Each epoch's shuffling, augmentation and dropout depend on (seed, epoch) only."""
    return seed * 1000 + epoch


def train_classifier(
    images: TrainValImages,
    n_classes: int | Mapping[str, int],
    recipe: Recipe,
    run: TrainingRunSettings,
    seed: int,
    device: torch.device,
    run_name: str,
    distributed: DistributedSettings = SINGLE_PROCESS,
) -> TrainingResult:
    """Train on train and select the best epoch on val; `run_name` keys the checkpoint folder.

    `n_classes`: the number of classes, or with several label columns task → its classes (the
    labels then have one column per task): one shared network, one head per task, and the best
    epoch is the one with the best mean of the tasks' val accuracies.

    With `distributed` over several processes, each trains on its share of every batch (DDP)
    and this returns rank 0's result. Torch's global RNG and thread count are the caller's again
    when this returns.
    """
    unresolved = [k for k, v in recipe.to_dict()["finetune"].items() if v == AUTO]
    if unresolved or recipe.backbone.image_size == AUTO:
        raise TrainingError(
            f"The recipe still has 'auto' values ({', '.join(unresolved) or 'image_size'}): "
            "resolve it from the data profile first (Recipe.resolve)."
        )
    if isinstance(n_classes, Mapping):
        _require_multi_task_recipe(recipe.finetune, list(n_classes))
    if distributed.world_size > 1:
        if distributed.world_size > recipe.finetune.batch_size:
            raise TrainingError(
                f"finetune.batch_size={recipe.finetune.batch_size} is smaller than the "
                f"{distributed.world_size} processes (distributed.nnodes × nproc_per_node): "
                "every process needs at least one image a step."
            )
        build_backbone(recipe.backbone, seed)  # downloads the weights once, before the workers
    return launch(
        distributed, device, _train_process, images, n_classes, recipe, run, seed, run_name
    )


def _require_multi_task_recipe(settings: FinetuneSettings, tasks: list[str]) -> None:
    """Mixing and class-balanced draws act on one labelling: refused with several tasks."""
    single_task_only = {
        "mixup": settings.mixup > 0,
        "cutmix": settings.cutmix > 0,
        "sampling": settings.sampling != "uniform",
    }
    for key, used in single_task_only.items():
        if used:
            raise TrainingError(
                f"finetune.{key}={getattr(settings, key)!r} works on one label column; with "
                f"several (data.label_columns={tasks}) set it back to its default, or train "
                "one task at a time."
            )


def _train_process(
    context: ProcessContext,
    images: TrainValImages,
    n_classes: int,
    recipe: Recipe,
    run: TrainingRunSettings,
    seed: int,
    run_name: str,
) -> TrainingResult | None:
    """One process's training; rank 0's result is the run's (the others return None)."""
    with isolated_randomness_and_threads(context.device):
        result = _epoch_loop(images, n_classes, recipe, run, seed, context, run_name)
    return result if context.is_main else None


@contextmanager
def isolated_randomness_and_threads(device: torch.device) -> Iterator[None]:
    """Training on a forked RNG and (on CPU) the training thread count: torch's global RNG and
    thread count are the caller's again afterwards."""
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    threads = cpu_threads() if device.type == "cpu" else nullcontext()
    with threads, torch.random.fork_rng(devices=rng_devices):
        yield


@dataclass
class _Session:
    """What one training process holds while its epochs run."""

    model: Classifier
    backbone: Backbone
    data: TrainingData
    criterion: TrainingLoss | MultiTaskLoss
    trainer: Trainer
    checkpointer: Checkpointer
    state: TrainingState
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    start_epoch: int
    context: ProcessContext
    n_classes: int | Mapping[str, int]


def _start(images, n_classes, recipe: Recipe, run, seed, context, run_name) -> _Session:
    """Build model, data and trainer; restore the checkpoint when resuming."""
    settings, device = recipe.finetune, context.device
    n_outputs = sum(n_classes.values()) if isinstance(n_classes, Mapping) else n_classes
    model, backbone = build_classifier(recipe.backbone, n_outputs, seed)
    if context.distributed:
        # BatchNorm statistics over the global batch, as one process would compute them.
        model = synchronise_batchnorm(model, device)
    model = model.to(device).to(memory_format=torch.channels_last)
    data = build_training_data(images, backbone, settings, run, context)
    criterion = training_criterion(data.train_labels, n_classes, settings).to(device)
    checkpointer = Checkpointer(
        Path(run.checkpoint_dir) / run_name / "last.pt",
        fingerprint(recipe, n_classes, seed, images),
        writes=context.is_main,
    )
    state = TrainingState(training_phase(settings, 0), _cpu_copy(model))
    checkpoint = checkpointer.restore(run.resume)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        criterion.load_state_dict(checkpoint.get("criterion", criterion.state_dict()))
        state = TrainingState(**checkpoint["state"])
        logger.info("Resuming %s after epoch %d", run_name, checkpoint["epoch"])
    optimizer, scheduler = make_optimizer(
        model, settings, state.phase, data.steps_per_epoch, criterion
    )
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
    set_trainable(model, state.phase)
    trainer = build_trainer(model, backbone, data, settings, run, context, criterion)
    start_epoch = int(checkpoint["epoch"]) if checkpoint else 0
    return _Session(
        model,
        backbone,
        data,
        criterion,
        trainer,
        checkpointer,
        state,
        optimizer,
        scheduler,
        start_epoch,
        context,
        n_classes,
    )


def _run_epoch(
    session: _Session, recipe: Recipe, run: TrainingRunSettings, seed: int, epoch: int, name: str
):
    """Train one epoch, validate, record it and write the checkpoint."""
    settings = recipe.finetune
    state, data = session.state, session.data
    phase = training_phase(settings, epoch)
    set_trainable(session.model, phase)  # also back to training mode after validation
    if phase != state.phase:
        state.phase = phase
        session.optimizer, session.scheduler = make_optimizer(
            session.model, settings, phase, data.steps_per_epoch, session.criterion
        )
        # DDP synchronises the parameters that require gradients when it wraps the model.
        session.trainer = build_trainer(
            session.model,
            session.backbone,
            data,
            settings,
            run,
            session.context,
            session.criterion,
        )
    # Augmentation is seeded per image (`EpochOrder`); dropout and mixing draw from the RNG as
    # this seed and the images decoded so far leave it: (seed, epoch, process) decide them.
    torch.manual_seed(epoch_seed(seed, epoch) + session.context.rank * 2**32)
    description = f"{name} epoch {epoch + 1}/{settings.epochs}"
    started = time.perf_counter()
    train_loss = session.trainer.train_epoch(
        data.train_loader(epoch_seed(seed, epoch)),
        session.optimizer,
        session.scheduler,
        description,
    )
    rate = data.steps_per_epoch * data.batch_size / (time.perf_counter() - started)
    val_loss, task_accuracies = session.trainer.validate(data.val_loader, data.val_labels)
    val_accuracy = float(np.nanmean(task_accuracies))  # one task: its accuracy
    record = {
        "epoch": epoch + 1,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_accuracy": val_accuracy,
        "lr": session.optimizer.param_groups[-1]["lr"],
        "train_images_per_second": rate,
    }
    if isinstance(session.n_classes, Mapping):
        for task, accuracy in zip(session.n_classes, task_accuracies, strict=True):
            record[f"val_accuracy.{task}"] = accuracy
    state.record(record, session.model)
    logger.info(
        "%s: train loss %.4f, val loss %.4f, val accuracy %.4f",
        description,
        train_loss,
        val_loss,
        val_accuracy,
    )
    session.checkpointer.save(
        epoch + 1, session.model, session.criterion, session.optimizer, session.scheduler, state
    )


def _epoch_loop(images, n_classes, recipe, run, seed, context, run_name) -> TrainingResult:
    settings = recipe.finetune
    session = _start(images, n_classes, recipe, run, seed, context, run_name)
    started = time.perf_counter()
    for epoch in range(session.start_epoch, settings.epochs):
        _run_epoch(session, recipe, run, seed, epoch, run_name)
        if session.state.out_of_patience(settings.patience):
            logger.info(
                "%s: no better val accuracy for %d epochs, stopping", run_name, settings.patience
            )
            session.state.stopped_early = True
            break
    seconds = time.perf_counter() - started
    state, data = session.state, session.data
    trained = (len(state.history) - session.start_epoch) * data.steps_per_epoch * data.batch_size
    return TrainingResult(
        state_dict=state.best_state,
        best_epoch=state.best_epoch,
        best_val_accuracy=state.best_val_accuracy,
        history=state.history,
        fit_seconds=seconds,
        trainable_parameters=trainable_parameter_count(session.model, settings),
        images_per_second=trained / seconds if seconds else 0.0,
        resumed_from_epoch=session.start_epoch,
        stopped_early=state.stopped_early,
        task_weights=(
            session.criterion.task_weights()
            if isinstance(session.criterion, MultiTaskLoss)
            else None
        ),
    )
