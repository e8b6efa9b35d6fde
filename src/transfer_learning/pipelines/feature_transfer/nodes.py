"""Nodes of the feature_transfer pipeline."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline

from transfer_learning.core.tasks import MISSING, Tasks
from transfer_learning.models.backbones import BackboneSettings
from transfer_learning.models.heads import FittedHead, HeadSettings, TaskHeads, select_and_fit
from transfer_learning.pipelines.templates.calibration.nodes import calibrated_other_seed
from transfer_learning.reporting.evaluation import align_probabilities
from transfer_learning.reporting.statistics import EvaluationSettings
from transfer_learning.serving.classifier import ImageClassifier
from transfer_learning.serving.packaging import head_image_model

logger = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


def split_features(image_features: Arrays) -> tuple[Arrays, Arrays]:
    """Features, labels and locations of the train and val splits, each on its own.

    Test rows stay behind: evaluation scores the test images with the packaged model.
    """
    # Features stored before label columns became tasks have `label` alone: one task.
    task_labels = image_features.get("task_labels", image_features["label"][:, None])
    parts = []
    for split in ("train", "val"):
        rows = image_features["split"] == split
        parts.append(
            {
                "features": image_features["features"][rows],
                "label": image_features["label"][rows],
                "task_labels": task_labels[rows],
                "location": image_features["location"][rows],
                "image_size": image_features["image_size"],
            }
        )
    return tuple(parts)


def fit_head(
    train_features: Arrays,
    val_features: Arrays,
    class_names: dict[str, Any],
    head: dict[str, Any],
    seed: int,
) -> tuple[Any, Any, dict[str, Any], Arrays]:
    """Choose the head's hyper-parameters on val, refit, and summarise the training.

    With several label columns, one head per task on the same features, each chosen and fitted
    on the rows that have its label (`heads.TaskHeads`). Returns the fitted head twice (the
    versioned catalog copy and the MLflow model), a summary with fit time, the chosen
    parameters and the search (per task under `tasks`), and the head's held-out predictions
    (out-of-fold on train+val when it is refitted on them, else on val) that calibrate it.
    """
    settings = HeadSettings.from_params(head)
    tasks = Tasks.from_class_names(class_names)
    fitted = {}
    for column, task in enumerate(tasks.names):
        train_rows = train_features["task_labels"][:, column] != MISSING
        val_rows = val_features["task_labels"][:, column] != MISSING
        fitted[task] = select_and_fit(
            (
                train_features["features"][train_rows],
                train_features["task_labels"][train_rows, column],
            ),
            (val_features["features"][val_rows], val_features["task_labels"][val_rows, column]),
            settings,
            seed,
        )
        _log_choice(settings, fitted[task], task if tasks.multi else "")
    first = fitted[tasks.names[0]]
    model = first.model if not tasks.multi else TaskHeads({t: f.model for t, f in fitted.items()})
    summary = {
        "strategy": "feature_transfer",
        "fit_seconds": sum(f.fit_seconds for f in fitted.values()),
        "val_accuracy": first.val_accuracy,
        "best_params": first.best_params,
        "selection": first.selection,
        "chosen": first.chosen,
        "search": first.search,
        "trainable_parameters": sum(_head_parameter_count(f.model) for f in fitted.values()),
        "head": first.head_type,
        "image_size": int(train_features["image_size"]),
        "resolved": {"image_size": int(train_features["image_size"]), "head": first.head_type},
    }
    if tasks.multi:
        summary["tasks"] = {
            task: {
                "val_accuracy": f.val_accuracy,
                "head": f.head_type,
                "best_params": f.best_params,
                "fit_seconds": f.fit_seconds,
            }
            for task, f in fitted.items()
        }
    return model, model, summary, _held_out_predictions(fitted, train_features, val_features, tasks)


def _held_out_predictions(
    fitted: dict[str, FittedHead], train_features: Arrays, val_features: Arrays, tasks: Tasks
) -> Arrays:
    """Every task's held-out probabilities on the train+val rows, in `score_images`'s layout:
    rows a task's head did not predict get MISSING as that task's label."""
    locations = np.concatenate([train_features["location"], val_features["location"]])
    task_labels = np.concatenate([train_features["task_labels"], val_features["task_labels"]])
    arrays: Arrays = {"location": locations.astype(str)}
    labels = np.full(task_labels.shape, MISSING, dtype=np.int64)
    hows = set()
    for column, (task, size) in enumerate(zip(tasks.names, tasks.sizes, strict=True)):
        probabilities = np.full((len(locations), size), 1.0 / size)
        held_out = fitted[task].held_out
        if held_out is not None:
            # A task's head saw only the rows with its label: map its rows back onto train+val.
            labelled = np.flatnonzero(task_labels[:, column] != MISSING)
            rows = labelled[held_out.rows]
            labels[rows, column] = task_labels[rows, column]
            probabilities[rows] = align_probabilities(
                held_out.probabilities, held_out.classes, size
            )
            hows.add(held_out.how)
        arrays[f"probabilities_{column}"] = probabilities
    if tasks.multi:
        arrays.update(
            task_labels=labels, label=labels[:, 0], probabilities=arrays["probabilities_0"]
        )
    else:  # one task: the rows its head held out
        kept = labels[:, 0] != MISSING
        arrays = {
            "location": arrays["location"][kept],
            "label": labels[kept, 0],
            "probabilities": arrays["probabilities_0"][kept],
        }
    arrays["held_out"] = np.asarray(", ".join(sorted(hows)) or "none")
    return arrays


def _log_choice(settings: HeadSettings, fitted: FittedHead, task: str) -> None:
    chosen = fitted.chosen
    logger.info(
        "Head %s%s chose %s %s by %s: accuracy %.4f ± %.4f, log-loss %.4f (%.1f s)",
        settings.type,
        f" for task {task!r}" if task else "",
        fitted.head_type,
        fitted.best_params,
        "cross-validation on train+val" if fitted.selection == "cv" else "val",
        chosen["val_accuracy"],
        chosen["val_accuracy_std"],
        chosen["val_log_loss"],
        fitted.fit_seconds,
    )


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


def package_head_model(
    head_model: Any,
    class_names: dict[str, Any],
    backbone: dict[str, Any],
    strategy: str,
) -> ImageClassifier:
    """The deployable images → probabilities model: backbone weights, preprocessing and head."""
    return head_image_model(
        head_model, class_names, BackboneSettings.from_params(backbone), strategy
    )


def fit_other_seeds(  # noqa: PLR0913 (fit_head's inputs, the backbone and the evaluation block)
    train_features: Arrays,
    val_features: Arrays,
    class_names: dict[str, Any],
    head: dict[str, Any],
    seed: int,
    backbone: dict[str, Any],
    evaluation: dict[str, Any],
) -> list[dict[str, Any]]:
    """The head fitted again with each other seed of `evaluation.seeds` (none by default): the
    seed sets the cross-validation folds and any randomness of the head; each model packaged
    and calibrated as the deployed one is. Each: `seed`, `image_model`,
    `held_out_predictions`, `fit_seconds`."""
    others = []
    for other in EvaluationSettings.from_params(evaluation).other_seeds(seed):
        model, _, summary, held_out = fit_head(
            train_features, val_features, class_names, head, other
        )
        packaged = package_head_model(model, class_names, backbone, "feature_transfer")
        others.append(
            calibrated_other_seed(other, packaged, held_out, class_names, summary["fit_seconds"])
        )
    return others
