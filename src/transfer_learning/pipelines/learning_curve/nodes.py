"""Nodes of the learning_curve pipeline."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from transfer_learning.core.runtime import resolve_device
from transfer_learning.core.strategies import COLOURS
from transfer_learning.core.tasks import require_single_task
from transfer_learning.models.heads import HeadSettings, select_and_fit
from transfer_learning.reporting.curves import (
    CURVE_COLUMNS,
    CurveSettings,
    curve_figure,
    curve_points,
    draw_subsets,
    images_per_class,
    report,
    summarise,
)
from transfer_learning.reporting.evaluation import align_probabilities, evaluate_predictions
from transfer_learning.serving.packaging import network_image_model
from transfer_learning.serving.scoring import score_test_split
from transfer_learning.training.recipe import Recipe, TrainingRunSettings, TrainValImages
from transfer_learning.training.trainer import train_classifier

logger = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


def draw_curve_subsets(
    image_index: pd.DataFrame, class_names: dict[str, Any], curve: dict[str, Any], seed: int
) -> pd.DataFrame:
    """The nested, stratified training sets of every (seed, size) point, drawn from train."""
    require_single_task(class_names, "learning_curve")
    settings = CurveSettings.from_params(curve)
    train = image_index[image_index["split"] == "train"].reset_index(drop=True)
    subsets = draw_subsets(train, settings, seed)
    logger.info(
        "Learning curve: sizes %s per class × %d seeds, strategies %s",
        settings.sizes(),
        settings.repeats,
        ", ".join(settings.strategies),
    )
    return subsets


def head_curve(
    image_features: Arrays,
    subsets: pd.DataFrame,
    class_names: dict[str, list[str]],
    head: dict[str, Any],
    curve: dict[str, Any],
    strategy: str,
) -> pd.DataFrame:
    """Every point of a strategy of the features kind, on the features extracted once: the
    `head` settings (type auto: prototype or logistic regression, chosen on val) fitted on the
    point's images alone (no refit on val), scored on the test features."""
    if strategy not in CurveSettings.from_params(curve).strategies:
        return pd.DataFrame(columns=CURVE_COLUMNS)
    settings = replace(HeadSettings.from_params(head), refit_on_train_val=False)
    row_of = {location: row for row, location in enumerate(image_features["location"])}
    split = image_features["split"]
    val = (image_features["features"][split == "val"], image_features["label"][split == "val"])
    test = (image_features["features"][split == "test"], image_features["label"][split == "test"])
    rows = []
    for seed, per_class, train in curve_points(subsets):
        positions = [row_of[location] for location in train["location"]]
        fitted = select_and_fit(
            (image_features["features"][positions], train["label"].to_numpy()), val, settings, seed
        )
        probabilities = align_probabilities(
            fitted.model.predict_proba(test[0]),
            fitted.model.classes_,
            len(class_names["classes"]),
        )
        rows.append(
            _point(strategy, per_class, seed, train, test[1], probabilities, class_names)
            | {"fit_seconds": fitted.fit_seconds, "head": fitted.head_type}
        )
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def finetuning_curve(  # noqa: PLR0913 (the points, the fine-tuning recipe blocks, run settings)
    subsets: pd.DataFrame,
    image_index: pd.DataFrame,
    class_names: dict[str, list[str]],
    backbone: dict[str, Any],
    finetune: dict[str, Any],
    overrides: dict[str, Any] | None,
    data_profile: dict[str, Any],
    training: dict[str, Any],
    curve: dict[str, Any],
    seed: int,
    device: str,
    strategy: str,
) -> pd.DataFrame:
    """Every point of a fine-tuning strategy: its recipe resolved for the point's training set
    size, trained with the val split for epoch selection, the packaged model scored on test."""
    if strategy not in CurveSettings.from_params(curve).strategies:
        return pd.DataFrame(columns=CURVE_COLUMNS)
    recipe = Recipe.from_params(backbone, finetune, overrides, strategy)
    run = replace(TrainingRunSettings.from_params(training), resume=False)
    val = image_index[image_index["split"] == "val"]
    test = image_index[image_index["split"] == "test"].reset_index(drop=True)
    n_classes = len(class_names["classes"])
    rows = []
    for point_seed, per_class, train in curve_points(subsets):
        resolved = recipe.resolve({**data_profile, "n_train": len(train)})
        result = train_classifier(
            TrainValImages.from_index(train, val),
            n_classes,
            resolved,
            run,
            point_seed,
            resolve_device(device),
            run_name=f"learning_curve/{strategy}",
        )
        checkpoint = {
            "state_dict": result.state_dict,
            "backbone_name": resolved.backbone.name,
            "image_size": int(resolved.backbone.image_size),
        }
        scored = score_test_split(network_image_model(checkpoint, class_names, strategy), test)
        rows.append(
            _point(
                strategy,
                per_class,
                point_seed,
                train,
                scored["label"],
                scored["probabilities"],
                class_names,
            )
            | {"fit_seconds": result.fit_seconds, "head": ""}
        )
        logger.info("learning curve %s: %s", strategy, rows[-1])
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def _point(strategy, per_class, seed, train, labels, probabilities, class_names) -> dict[str, Any]:
    metrics = evaluate_predictions(labels, probabilities, class_names["classes"])[0]
    return {
        "strategy": strategy,
        "per_class": per_class,
        "images_per_class": images_per_class(train["label"].to_numpy()),
        "seed": seed,
        "accuracy": metrics["accuracy"],
        "balanced_accuracy": metrics["balanced_accuracy"],
    }


def report_learning_curve(
    image_index: pd.DataFrame, *strategy_curves: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame, str, Figure]:
    """The whole curve (one row per run: the CSV, and the MLflow child runs), learning_curve.md
    with means and intervals, and the figure."""
    curve = pd.concat(
        [frame for frame in strategy_curves if not frame.empty], ignore_index=True
    ).reindex(columns=CURVE_COLUMNS)
    summary = summarise(curve)
    test_images = int((image_index["split"] == "test").sum())
    colours = COLOURS
    return curve, curve, report(summary, test_images), curve_figure(summary, colours)
