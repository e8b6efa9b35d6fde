"""Nodes of the network-training template (every strategy of the network kind: they differ only in parameters)."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from transfer_learning.core.distributed import DistributedSettings
from transfer_learning.core.runtime import resolve_device
from transfer_learning.core.tasks import Tasks
from transfer_learning.kedro_io.tracking import MlflowMetrics
from transfer_learning.pipelines.templates.calibration.nodes import calibrated_other_seed
from transfer_learning.reporting.statistics import EvaluationSettings
from transfer_learning.serving.classifier import ImageClassifier
from transfer_learning.serving.packaging import network_image_model
from transfer_learning.serving.scoring import score_val_split
from transfer_learning.training.recipe import Recipe, TrainingRunSettings, TrainValImages
from transfer_learning.training.trainer import train_classifier

logger = logging.getLogger(__name__)

HISTORY_METRICS = ("train_loss", "val_loss", "val_accuracy", "lr", "train_images_per_second")


def split_train_val(image_index: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The train and val rows of the image index, each on its own (test is evaluation's)."""
    return tuple(
        image_index[image_index["split"] == split].reset_index(drop=True)
        for split in ("train", "val")
    )


def resolve_recipe(
    backbone: dict[str, Any],
    finetune: dict[str, Any],
    overrides: dict[str, Any] | None,
    data_profile: dict[str, Any],
    strategy: str,
) -> Recipe:
    """The shared `backbone` and `finetune` blocks with the `<strategy>` block's keys over them,
    every `auto` resolved from the data profile.

    Every key on either side is checked for typos.
    """
    recipe = Recipe.from_params(backbone, finetune, overrides, strategy).resolve(data_profile)
    logger.info("%s recipe: %s", strategy, recipe.to_dict())
    return recipe


def train_model(  # noqa: PLR0913 (a training run's inputs, each a catalog entry or parameter)
    train_index: pd.DataFrame,
    val_index: pd.DataFrame,
    class_names: dict[str, Any],
    recipe: Recipe,
    training: dict[str, Any],
    seed: int,
    device: str,
    distributed: dict[str, Any],
    strategy: str,
    run_name: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any], MlflowMetrics]:
    """Train on train, keep the epoch with the best val accuracy (on `distributed.*` processes).

    `run_name` (the strategy's name by default) keys the checkpoint folder of `training.resume`.

    With several label columns: one network with a head per task, the loss summed over the tasks
    (`finetune.task_weights`); the best epoch has the best mean val accuracy over the tasks.

    Returns the best checkpoint (weights and plain values: a versioned catalog artefact), the
    training summary and the per-epoch metric histories.
    """
    tasks = Tasks.from_class_names(class_names)
    images = TrainValImages.from_index(train_index, val_index, tasks)
    result = train_classifier(
        images,
        dict(zip(tasks.names, tasks.sizes, strict=True)) if tasks.multi else tasks.sizes[0],
        recipe,
        TrainingRunSettings.from_params(training),
        seed,
        resolve_device(device),
        run_name=run_name or strategy,
        distributed=DistributedSettings.from_params(distributed),
    )
    checkpoint = {
        "state_dict": result.state_dict,
        "n_classes": sum(tasks.sizes),  # the network's outputs: every task's classes
        "backbone_name": recipe.backbone.name,
        "image_size": int(recipe.backbone.image_size),
    }
    summary = {
        "strategy": strategy,
        "recipe": recipe.to_dict(),
        "image_size": checkpoint["image_size"],
        "resolved": {
            "image_size": checkpoint["image_size"],
            "batch_size": recipe.finetune.batch_size,
            "epochs": recipe.finetune.epochs,
            "hflip": recipe.finetune.hflip,
        },
        "fit_seconds": result.fit_seconds,
        "best_epoch": result.best_epoch,
        "best_val_accuracy": result.best_val_accuracy,
        "epochs_run": len(result.history),
        "resumed_from_epoch": result.resumed_from_epoch,
        "stopped_early": result.stopped_early,
        "trainable_parameters": result.trainable_parameters,
        "train_images_per_second": result.images_per_second,
    }
    names = list(HISTORY_METRICS)
    if tasks.multi:
        best = result.history[result.best_epoch - 1]  # the history holds every epoch run
        summary["tasks"] = {
            task: {"best_val_accuracy": best[f"val_accuracy.{task}"], "loss_weight": weight}
            for task, weight in zip(tasks.names, result.task_weights, strict=True)
        }
        names += [f"val_accuracy.{task}" for task in tasks.names]
    history = {
        name: [{"value": float(row[name]), "step": int(row["epoch"])} for row in result.history]
        for name in names
    }
    return checkpoint, summary, history


def package_network_model(
    model_checkpoint: dict[str, Any], class_names: dict[str, Any], strategy: str
) -> ImageClassifier:
    """The deployable images → probabilities model, from the best checkpoint."""
    return network_image_model(model_checkpoint, class_names, strategy)


def train_other_seeds(  # noqa: PLR0913 (train_model's inputs and the evaluation block)
    train_index: pd.DataFrame,
    val_index: pd.DataFrame,
    class_names: dict[str, Any],
    recipe: Recipe,
    training: dict[str, Any],
    seed: int,
    device: str,
    distributed: dict[str, Any],
    evaluation: dict[str, Any],
    strategy: str,
) -> list[dict[str, Any]]:
    """The strategy trained again with each other seed of `evaluation.seeds` (none by default),
    each model packaged and calibrated on val as the deployed one is, for the evaluation to
    measure how much the result depends on the seed. Each: `seed`, `image_model`,
    `held_out_predictions`, `fit_seconds`."""
    others = []
    for other in EvaluationSettings.from_params(evaluation).other_seeds(seed):
        logger.info("%s: training again with seed %d (evaluation.seeds)", strategy, other)
        checkpoint, summary, _ = train_model(
            train_index,
            val_index,
            class_names,
            recipe,
            training,
            other,
            device,
            distributed,
            strategy,
            run_name=f"{strategy}/seed_{other}",
        )
        model = package_network_model(checkpoint, class_names, strategy)
        held_out = score_val_split(model, val_index)
        others.append(
            calibrated_other_seed(other, model, held_out, class_names, summary["fit_seconds"])
        )
    return others
