"""Nodes of the feature_transfer pipeline."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline

from transfer_learning.backbones import BackboneSettings, build_backbone
from transfer_learning.heads import HeadSettings, select_and_fit
from transfer_learning.serving import ImageClassifier

logger = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


def split_features(image_features: Arrays) -> tuple[Arrays, Arrays]:
    """Features, labels and locations of the train and val splits, each on its own.

    Test rows stay behind: evaluation scores the test images with the packaged model.
    """
    parts = []
    for split in ("train", "val"):
        rows = image_features["split"] == split
        parts.append(
            {
                "features": image_features["features"][rows],
                "label": image_features["label"][rows],
                "location": image_features["location"][rows],
                "image_size": image_features["image_size"],
            }
        )
    return tuple(parts)


def fit_head(
    train_features: Arrays, val_features: Arrays, head: dict[str, Any], seed: int
) -> tuple[Pipeline, Pipeline, dict[str, Any]]:
    """Choose the head's hyper-parameters on val, refit, and summarise the training.

    Returns the fitted sklearn pipeline twice (the versioned catalog copy and the MLflow
    model) and a summary with fit time, the chosen parameters and the search.
    """
    settings = HeadSettings.from_params(head)
    fitted = select_and_fit(
        (train_features["features"], train_features["label"]),
        (val_features["features"], val_features["label"]),
        settings,
        seed,
    )
    chosen = fitted.chosen
    logger.info(
        "Head %s chose %s %s by %s: accuracy %.4f ± %.4f, log-loss %.4f (%.1f s)",
        settings.type,
        fitted.head_type,
        fitted.best_params,
        "cross-validation on train+val" if fitted.selection == "cv" else "val",
        chosen["val_accuracy"],
        chosen["val_accuracy_std"],
        chosen["val_log_loss"],
        fitted.fit_seconds,
    )
    summary = {
        "strategy": "feature_transfer",
        "fit_seconds": fitted.fit_seconds,
        "val_accuracy": fitted.val_accuracy,
        "best_params": fitted.best_params,
        "selection": fitted.selection,
        "chosen": chosen,
        "search": fitted.search,
        "trainable_parameters": _head_parameter_count(fitted.model),
        "head": fitted.head_type,
        "image_size": int(train_features["image_size"]),
        "resolved": {"image_size": int(train_features["image_size"]), "head": fitted.head_type},
    }
    return fitted.model, fitted.model, summary


def _head_parameter_count(model: Pipeline) -> int:
    classifier = model[-1]
    classifier = getattr(classifier, "classifier", classifier)  # inside logit adjustment
    if hasattr(classifier, "prototypes_"):
        return int(np.size(classifier.prototypes_))
    coef = getattr(classifier, "coef_", None)
    intercept = getattr(classifier, "intercept_", None)
    if coef is None:
        return 0
    return int(np.size(coef) + (np.size(intercept) if intercept is not None else 0))


def package_image_model(
    head_model: Pipeline,
    class_names: dict[str, list[str]],
    backbone: dict[str, Any],
    strategy: str = "feature_transfer",
) -> ImageClassifier:
    """The deployable images → probabilities model: backbone weights, preprocessing and head
    (`strategy`: its name; domain_adaptation packages adapted heads as `feature_transfer_<method>`)."""
    features = build_backbone(BackboneSettings.from_params(backbone))
    return ImageClassifier(
        strategy=strategy,
        classes=class_names["classes"],
        backbone_name=features.name,
        image_size=features.preprocessing.image_size,
        network_state=features.features.state_dict(),
        head=head_model,
    )
