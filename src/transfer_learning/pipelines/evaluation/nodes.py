"""Nodes of the evaluation pipeline (one set for all strategies)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from transfer_learning.core.tasks import Tasks, predicted_by_seed, task_predictions
from transfer_learning.kedro_io.tracking import MlflowMetrics, mlflow_metrics
from transfer_learning.models.calibration import apply_temperature
from transfer_learning.reporting.evaluation import (
    confusion_matrices_figure,
    evaluate_predictions,
    expected_calibration_error,
    reliability_figure,
)
from transfer_learning.reporting.statistics import (
    INTERVAL_METRICS,
    bootstrap_intervals,
    metrics_by_seed,
)
from transfer_learning.serving.classifier import ImageModel
from transfer_learning.serving.packaging import local_image_classifier
from transfer_learning.serving.scoring import score_test_split

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


def score_other_seeds(
    other_seeds: list[dict[str, Any]], test_index: pd.DataFrame
) -> dict[str, np.ndarray]:
    """Predicted labels of the test images from the strategy's models trained with its other
    seeds (`evaluation.seeds`): `seeds` and, per task k, `predicted_<k>` (seeds × the images
    with task k's label); only `seeds`, empty, when the strategy was trained once."""
    arrays = {"seeds": np.array([other["seed"] for other in other_seeds], dtype=np.int64)}
    scored = [score_test_split(other["image_model"], test_index) for other in other_seeds]
    for k in range(len(scored[0]["temperatures"]) if scored else 0):  # one T per task
        arrays[f"predicted_{k}"] = np.stack(
            [task_predictions(predictions, k)[1].argmax(axis=1) for predictions in scored]
        )
    return arrays


def evaluate_test_predictions(
    test_predictions: dict[str, np.ndarray],
    seed_predictions: dict[str, np.ndarray],
    training_summary: dict[str, Any],
    class_names: dict[str, Any],
    strategy: str,
) -> tuple[dict[str, Any], pd.DataFrame, Figure, Figure, MlflowMetrics, dict[str, Any]]:
    """Metrics, per-class table, confusion matrix and reliability diagram on the test split,
    and the values the strategy's `auto` settings resolved to (logged as MLflow parameters).

    With `seed_predictions` of other seeds' models (`evaluation.seeds` > 1), accuracy, balanced
    accuracy and macro-F1 are the means over every seed's model, their intervals cover the
    seeds as well as the test images, and `seeds` lists each seed's figures (the deployed model
    first); the per-class table, the figures and the ECE are the deployed model's.

    With several tasks, each is evaluated on the test images with its label: the report keeps
    the first task's metrics at the top and adds `tasks` (task → accuracy, balanced accuracy,
    macro-F1, ECE, n_test); the per-class table gains a `task` column and the confusion-matrix
    figure a panel per task; MLflow gets `<task>.<metric>` too.
    """
    tasks = Tasks.from_class_names(class_names)
    evaluated, intervals, seeds = {}, {}, {}
    for k, task in enumerate(tasks.names):
        labels, probabilities = task_predictions(test_predictions, k)
        evaluated[task] = evaluate_predictions(labels, probabilities, tasks.classes[task])
        evaluated[task][0].update(_uncalibrated(test_predictions, k, labels, probabilities))
        by_seed = predicted_by_seed(test_predictions, seed_predictions, k)
        n_classes = len(tasks.classes[task])
        intervals[task] = {
            f"{name}_interval": interval
            for name, interval in bootstrap_intervals(labels, by_seed, n_classes).items()
        }
        seeds[task] = _over_seeds(labels, by_seed, n_classes, seed_predictions)
        if len(by_seed) > 1:
            evaluated[task][0].update({n: seeds[task][f"{n}_mean"] for n in INTERVAL_METRICS})
    metrics, per_class, reliability, _ = evaluated[tasks.names[0]]
    metrics["fit_seconds"] = float(training_summary["fit_seconds"])
    metrics["predict_seconds"] = float(test_predictions.get("predict_seconds", 0.0))
    metrics["trainable_parameters"] = int(training_summary.get("trainable_parameters", 0))
    resolved = dict(training_summary.get("resolved", {}))
    recall = dict(zip(per_class["class_name"], per_class["recall"].astype(float), strict=True))
    first = intervals[tasks.names[0]]
    report = {
        "strategy": strategy,
        **metrics,
        **first,
        **resolved,
        "recall": recall,
        "seeds": seeds[tasks.names[0]],
    }
    logged = {**metrics, **_interval_ends(first), "seeds": seeds[tasks.names[0]]["count"]}
    title = f"{strategy}: confusion matrix (test)"
    matrices = {title: (evaluated[tasks.names[0]][3], tasks.primary)}
    if tasks.multi:
        report["tasks"] = {
            task: {
                **{name: result[0][name] for name in TASK_METRICS},
                **intervals[task],
                "seeds": seeds[task],
            }
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


def _over_seeds(
    labels: np.ndarray, by_seed: np.ndarray, n_classes: int, seed_predictions: dict
) -> dict[str, Any]:
    """How many seeds' models were scored and, with several, each one's figures (the deployed
    model's first), their means and the accuracy's standard deviation over the seeds."""
    if len(by_seed) == 1:
        return {"count": 1}
    figures = metrics_by_seed(labels, by_seed, n_classes)
    return {
        "count": len(by_seed),
        "other_seeds": [int(seed) for seed in seed_predictions["seeds"]],
        **{name: [float(v) for v in values] for name, values in figures.items()},
        **{f"{name}_mean": float(values.mean()) for name, values in figures.items()},
        "accuracy_sd": float(figures["accuracy"].std(ddof=1)),
    }


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
