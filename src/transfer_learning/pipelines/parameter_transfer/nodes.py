"""Nodes shared by parameter_transfer and structure_transfer (they differ only in parameters)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from transfer_learning.backbones import Backbone, BackboneSettings
from transfer_learning.extraction import resolve_device
from transfer_learning.finetune import (
    Classifier,
    FinetuneSettings,
    build_classifier,
    predict_probabilities,
    train_classifier,
)
from transfer_learning.serving import ImageClassifier
from transfer_learning.tracking import MlflowMetrics

logger = logging.getLogger(__name__)


def split_index(image_index: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The train, val and test rows of the image index, each on its own."""
    return tuple(
        image_index[image_index["split"] == split].reset_index(drop=True)
        for split in ("train", "val", "test")
    )


def _backbone_settings(backbone: dict[str, Any], finetune: dict[str, Any]) -> BackboneSettings:
    settings = BackboneSettings.from_params(backbone)
    size = finetune.get("image_size") or settings.image_size
    return BackboneSettings(settings.name, size, settings.pretrained, settings.weights_path)


def train_model(
    train_index: pd.DataFrame,
    val_index: pd.DataFrame,
    class_names: dict[str, list[str]],
    backbone: dict[str, Any],
    finetune: dict[str, Any],
    finetune_overrides: dict[str, Any],
    seed: int,
    device: str,
    strategy: str,
) -> tuple[dict[str, Any], Classifier, dict[str, Any], MlflowMetrics]:
    """Train on train, keep the epoch with the best val accuracy.

    `finetune` is the shared recipe; `finetune_overrides` the strategy's own keys over it.

    Returns the best checkpoint (a versioned catalog artefact), the same model as a module (the
    MLflow PyTorch model), the training summary and the per-epoch metric histories.
    """
    finetune = {**finetune, **(finetune_overrides or {})}
    settings = FinetuneSettings.from_params(
        {k: v for k, v in finetune.items() if k != "image_size"}
    )
    backbone_settings = _backbone_settings(backbone, finetune)
    n_classes = len(class_names["classes"])
    result = train_classifier(
        (train_index["location"].tolist(), val_index["location"].tolist()),
        (train_index["label"].to_numpy(), val_index["label"].to_numpy()),
        n_classes,
        backbone_settings,
        settings,
        seed,
        resolve_device(device),
        run_name=strategy,
    )
    checkpoint = {
        "state_dict": result.state_dict,
        "n_classes": n_classes,
        "backbone_name": backbone_settings.name,
        "image_size": int(backbone_settings.image_size or 0),
    }
    model, _ = load_model(checkpoint)
    summary = {
        "strategy": strategy,
        "init": settings.init,
        "finetune_strategy": settings.strategy,
        "image_size": checkpoint["image_size"],
        "fit_seconds": result.fit_seconds,
        "best_epoch": result.best_epoch,
        "best_val_accuracy": result.best_val_accuracy,
        "epochs_run": len(result.history),
        "resumed_from_epoch": result.resumed_from_epoch,
        "stopped_early": result.stopped_early,
        "trainable_parameters": result.trainable_parameters,
        "train_images_per_second": result.images_per_second,
    }
    history = {
        name: [{"value": float(row[name]), "step": int(row["epoch"])} for row in result.history]
        for name in ("train_loss", "val_loss", "val_accuracy", "lr", "train_images_per_second")
    }
    return checkpoint, model, summary, history


def load_model(checkpoint: dict[str, Any]) -> tuple[Classifier, Backbone]:
    """Rebuild the trained classifier and its backbone's preprocessing from a checkpoint.

    No download: the architecture is built empty and every weight comes from the checkpoint.
    """
    settings = BackboneSettings(
        checkpoint["backbone_name"], checkpoint["image_size"] or None, pretrained=False
    )
    model, backbone = build_classifier(
        settings, FinetuneSettings(init="random"), checkpoint["n_classes"], seed=0
    )
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), backbone


def predict_test_split(
    model_checkpoint: dict[str, Any], test_index: pd.DataFrame, device: str
) -> dict[str, np.ndarray]:
    """Class probabilities on the test split with the deterministic evaluation transform."""
    model, backbone = load_model(model_checkpoint)
    probabilities = predict_probabilities(
        model, test_index["location"].tolist(), backbone, 128, resolve_device(device)
    )
    return {
        "label": test_index["label"].to_numpy(np.int64),
        "probabilities": probabilities,
        "location": test_index["location"].to_numpy(str),
    }


def package_image_model(
    model_checkpoint: dict[str, Any], class_names: dict[str, list[str]], strategy: str
) -> tuple[ImageClassifier, ImageClassifier]:
    """The deployable images → probabilities model (returned for the local and MLflow copies)."""
    model = ImageClassifier(
        strategy=strategy,
        classes=class_names["classes"],
        backbone_name=model_checkpoint["backbone_name"],
        image_size=model_checkpoint["image_size"],
        network_state=model_checkpoint["state_dict"],
    )
    return model, model
