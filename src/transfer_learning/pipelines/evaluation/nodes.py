"""Nodes of the evaluation pipeline (one set for all strategies)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from transfer_learning.evaluation import (
    confusion_matrix_figure,
    evaluate_predictions,
    reliability_figure,
)
from transfer_learning.packaging import local_image_classifier
from transfer_learning.serving import ImageClassifier, probability_matrix
from transfer_learning.tracking import MlflowMetrics, mlflow_metrics

logger = logging.getLogger(__name__)


class EvaluationError(RuntimeError):
    """The test split cannot be scored."""


def select_test_split(image_index: pd.DataFrame) -> pd.DataFrame:
    """The test rows of the image index: read by evaluation alone."""
    return image_index[image_index["split"] == "test"].reset_index(drop=True)


def score_test_split(image_model: Any, test_index: pd.DataFrame) -> dict[str, np.ndarray]:
    """Class probabilities of the test images from the deployable model itself.

    `image_model` is the packaged `ImageClassifier` (or the MLflow pyfunc that wraps it): the same
    code that `predict` and `mlflow models serve` run, so the metrics describe what is deployed.
    """
    locations = test_index["location"].tolist()
    predictions = local_image_classifier(image_model).predict_files(locations)
    failed = predictions[predictions["error"] != ""]
    if not failed.empty:
        listing = "\n".join(
            f"  {locations[i]}: {message}"
            for i, message in failed["error_message"].head(20).items()
        )
        raise EvaluationError(
            f"{len(failed)} test image(s) could not be scored:\n{listing}\n"
            "Fix or remove them and re-run data_ingestion (data.on_corrupt=skip leaves "
            "unreadable files out)."
        )
    return {
        "label": test_index["label"].to_numpy(np.int64),
        "probabilities": probability_matrix(predictions),
        "location": np.asarray(locations, dtype=str),
    }


def evaluate_test_predictions(
    test_predictions: dict[str, np.ndarray],
    training_summary: dict[str, Any],
    class_names: dict[str, list[str]],
    strategy: str,
) -> tuple[dict[str, Any], pd.DataFrame, Figure, Figure, MlflowMetrics, dict[str, Any]]:
    """Metrics, per-class table, confusion matrix and reliability diagram on the test split,
    and the values the strategy's `auto` settings resolved to (logged as MLflow parameters)."""
    names = class_names["classes"]
    metrics, per_class, reliability, matrix = evaluate_predictions(
        test_predictions["label"], test_predictions["probabilities"], names
    )
    metrics["fit_seconds"] = float(training_summary["fit_seconds"])
    metrics["trainable_parameters"] = int(training_summary.get("trainable_parameters", 0))
    resolved = dict(training_summary.get("resolved", {}))
    recall = dict(zip(per_class["class_name"], per_class["recall"].astype(float), strict=True))
    report = {"strategy": strategy, **metrics, **resolved, "recall": recall}
    return (
        report,
        per_class,
        confusion_matrix_figure(matrix, names, f"{strategy}: confusion matrix (test)"),
        reliability_figure(reliability, metrics["ece"], f"{strategy}: reliability (test)"),
        mlflow_metrics(metrics),
        resolved,
    )


def register_image_model(image_model: Any) -> ImageClassifier:
    """The evaluated model, to be logged and registered in MLflow as transfer_learning_<strategy>."""
    return local_image_classifier(image_model)  # loaded back from disk, it comes wrapped
