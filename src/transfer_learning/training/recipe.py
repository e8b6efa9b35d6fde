"""Training a backbone + new head with PyTorch: parameter transfer and structure transfer.

Every epoch draws its randomness from (seed, epoch) alone and ends with an atomic checkpoint, so a
run killed mid-training and resumed ends exactly where an uninterrupted run ends.

The parts, in the order `train_classifier` uses them: the settings (`Recipe`: what decides the
weights; `TrainingRunSettings`: how to run), `build_classifier`, `TrainingData` (the loaders),
`make_optimizer`, `Trainer` (one epoch, validation), `TrainingState` and `Checkpointer`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from transfer_learning.core.config import (
    check_known_keys,
    positive_int,
    require_known_keys,
    with_overrides,
)
from transfer_learning.core.tasks import Tasks
from transfer_learning.models.backbones import (
    AUTO,
    BackboneError,
    BackboneSettings,
    resolve_image_size,
)

logger = logging.getLogger(__name__)

MODES = ("linear_probe", "full", "lp_ft")
LOSSES = ("cross_entropy", "logit_adjusted", "balanced_softmax")
SAMPLINGS = ("uniform", "class_balanced")
TASK_WEIGHTS = ("equal", "uncertainty")
# `epochs: auto` bounds: every image is seen a few times; tiny sets do not loop for ever.
MIN_AUTO_EPOCHS = 3
MAX_AUTO_EPOCHS = 60
MIN_AUTO_PATIENCE = 3
# freeze_stride auto with pretrained weights: the layers at 1/2 and 1/4 of the image's
# resolution stay as pretrained. They hold ~0.5 % of the weights and most of the activations, so
# training skips their backward pass: 1.8x the images per second for EfficientNet-Lite0 at
# 224 px on a CPU (docs/benchmarks.md, issue 29).
PRETRAINED_FREEZE_STRIDE = 4


class TrainingError(RuntimeError):
    """Training cannot go on (bad settings, non-finite loss, out of memory)."""


# ---- settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneSettings:
    """The `finetune` recipe (parameters_finetune.yml): everything that decides the weights."""

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
    # Leading layers whose outputs are at most this many times smaller than the image keep
    # their weights and BatchNorm statistics (no gradients flow through them). auto: 4 for
    # pretrained weights on photos seen at their own resolution (the stem and first stages:
    # edges and colours, as detectron2's FREEZE_AT=2); None for random weights (nothing to
    # keep) and for enlarged small images, whose blurred pixels the early layers must learn.
    freeze_stride: int | str | None = AUTO
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
            "steps": positive_int(settings.steps),
            "batch_size": _auto_or_positive(settings.batch_size),
            "hflip": settings.hflip in (True, False, AUTO),
            "freeze_stride": settings.freeze_stride is None
            or _auto_or_positive(settings.freeze_stride),
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
                "conf/base/parameters_finetune.yml for the allowed values."
            )
        return settings

    def resolve(
        self, n_train: int, mirror_symmetric: bool, *, pretrained: bool, enlarged: bool = False
    ) -> FinetuneSettings:
        """The recipe with every `auto` replaced: batch size and epochs from the number of
        training images (a budget in optimiser steps, not epochs), flips from the data's symmetry,
        the frozen early layers from whether the weights are pretrained.

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
        return replace(
            self,
            batch_size=batch_size,
            epochs=epochs,
            hflip=hflip,
            patience=patience,
            freeze_stride=self.frozen_stride(pretrained, enlarged),
        )

    def frozen_stride(self, pretrained: bool, enlarged: bool = False) -> int | None:
        """`freeze_stride` with `auto` resolved: pretrained weights keep their early layers,
        unless the images are enlarged to the network's size (digits at 48 px from 8: freezing
        took the fine-tuned pretrained network from 98.6 % to 81.7 % there)."""
        if self.freeze_stride == AUTO:
            return PRETRAINED_FREEZE_STRIDE if pretrained and not enlarged else None
        return self.freeze_stride  # type: ignore[return-value]


def _non_negative(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def _auto_or_positive(value: Any) -> bool:
    return value == AUTO or positive_int(value)


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
        if settings.micro_batch_size is not None and not positive_int(settings.micro_batch_size):
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
        short_side = data_profile["typical_short_side"]
        backbone = resolve_image_size(self.backbone, short_side)
        return Recipe(
            backbone,
            self.finetune.resolve(
                data_profile["n_train"],
                data_profile["mirror_symmetric"],
                pretrained=self.backbone.pretrained,
                enlarged=short_side is not None and short_side < backbone.image_size,
            ),
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


# ---- data ------------------------------------------------------------------------------------


# ---- optimiser -------------------------------------------------------------------------------


# ---- one epoch -------------------------------------------------------------------------------


# ---- state and checkpoints -------------------------------------------------------------------


# ---- the epoch loop --------------------------------------------------------------------------
