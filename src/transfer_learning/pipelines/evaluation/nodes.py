"""Nodes of the evaluation pipeline (one set for all strategies)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from transfer_learning.core.tasks import Tasks, task_predictions
from transfer_learning.kedro_io.tracking import MlflowMetrics, mlflow_metrics
from transfer_learning.models.calibration import apply_temperature
from transfer_learning.reporting.evaluation import (
    confusion_matrices_figure,
    evaluate_predictions,
    expected_calibration_error,
    reliability_figure,
)
from transfer_learning.reporting.statistics import bootstrap_intervals
from transfer_learning.serving.classifier import ImageModel
from transfer_learning.serving.packaging import local_image_classifier

logger = logging.getLogger(__name__)

# What the report gives for every task of a multi-task model (`tasks` in <strategy>_metrics.json).
TASK_METRICS = (
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "ece",
    "ece_uncalibrated",
    "temperature",
    "n_test",
)


def evaluate_test_predictions(
    test_predictions: dict[str, np.ndarray],
    training_summary: dict[str, Any],
    class_names: dict[str, Any],
    strategy: str,
) -> tuple[dict[str, Any], pd.DataFrame, Figure, Figure, MlflowMetrics, dict[str, Any]]:
    """Metrics, per-class table, confusion matrix and reliability diagram on the test split,
    and the values the strategy's `auto` settings resolved to (logged as MLflow parameters).

    With several tasks, each is evaluated on the test images with its label: the report keeps
    the first task's metrics at the top and adds `tasks` (task → accuracy, balanced accuracy,
    macro-F1, ECE, n_test); the per-class table gains a `task` column and the confusion-matrix
    figure a panel per task; MLflow gets `<task>.<metric>` too.
    """
    tasks = Tasks.from_class_names(class_names)
    evaluated, intervals = {}, {}
    for k, task in enumerate(tasks.names):
        labels, probabilities = task_predictions(test_predictions, k)
        evaluated[task] = evaluate_predictions(labels, probabilities, tasks.classes[task])
        evaluated[task][0].update(_uncalibrated(test_predictions, k, labels, probabilities))
        intervals[task] = {
            f"{name}_interval": interval
            for name, interval in bootstrap_intervals(
                labels, probabilities.argmax(axis=1), len(tasks.classes[task])
            ).items()
        }
    metrics, per_class, reliability, _ = evaluated[tasks.names[0]]
    metrics["fit_seconds"] = float(training_summary["fit_seconds"])
    metrics["predict_seconds"] = float(test_predictions.get("predict_seconds", 0.0))
    metrics["trainable_parameters"] = int(training_summary.get("trainable_parameters", 0))
    resolved = dict(training_summary.get("resolved", {}))
    recall = dict(zip(per_class["class_name"], per_class["recall"].astype(float), strict=True))
    first = intervals[tasks.names[0]]
    report = {"strategy": strategy, **metrics, **first, **resolved, "recall": recall}
    logged = {**metrics, **_interval_ends(first)}
    title = f"{strategy}: confusion matrix (test)"
    matrices = {title: (evaluated[tasks.names[0]][3], tasks.primary)}
    if tasks.multi:
        report["tasks"] = {
            task: {**{name: result[0][name] for name in TASK_METRICS}, **intervals[task]}
            for task, result in evaluated.items()
        }
        logged.update(
            {
                f"{task}.{name}": value
                for task in tasks.names
                for name, value in {
                    **{name: evaluated[task][0][name] for name in TASK_METRICS},
                    **_interval_ends(intervals[task]),
                }.items()
            }
        )
        per_class = pd.concat(
            [result[1].assign(task=task) for task, result in evaluated.items()], ignore_index=True
        )[["task", *per_class.columns]]
        matrices = {
            f"{strategy}: {task} (test)": (result[3], tasks.classes[task])
            for task, result in evaluated.items()
        }
    return (
        report,
        per_class,
        confusion_matrices_figure(matrices),
        reliability_figure(reliability, metrics["ece"], f"{strategy}: reliability (test)"),
        mlflow_metrics(logged),
        resolved,
    )


def _uncalibrated(
    arrays: dict[str, np.ndarray], task: int, labels: np.ndarray, probabilities: np.ndarray
) -> dict[str, float]:
    """The model's temperature and the test ECE it would have without it: p = softmax(T log p')
    undoes p' = softmax(log p / T) exactly."""
    temperature = float(arrays["temperatures"][task]) if "temperatures" in arrays else 1.0
    before = apply_temperature(probabilities, 1.0 / temperature)
    return {
        "temperature": temperature,
        "ece_uncalibrated": expected_calibration_error(labels, before)[0],
    }


def _interval_ends(intervals: dict[str, list[float]]) -> dict[str, float]:
    """`accuracy_interval: [low, high]` → MLflow metrics `accuracy_interval_low`, `_high`."""
    return {
        f"{name}_{end}": value
        for name, (low, high) in intervals.items()
        for end, value in (("low", low), ("high", high))
    }


def register_image_model(image_model: Any) -> ImageModel:
    """The evaluated model, to be logged and registered in MLflow as transfer_learning_<strategy>."""
    return local_image_classifier(image_model)  # loaded back from disk, it comes wrapped
