"""Nodes of the evaluation pipeline (one set for all strategies)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from transfer_learning.evaluation import (
    confusion_matrix_figure,
    evaluate_predictions,
    reliability_figure,
)
from transfer_learning.tracking import MlflowMetrics, mlflow_metrics


def evaluate_test_predictions(
    test_predictions: dict[str, np.ndarray],
    training_summary: dict[str, Any],
    class_names: dict[str, list[str]],
) -> tuple[dict[str, Any], pd.DataFrame, Figure, Figure, MlflowMetrics]:
    """Metrics, per-class table, confusion matrix and reliability diagram on the test split."""
    names = class_names["classes"]
    strategy = training_summary["strategy"]
    metrics, per_class, reliability, matrix = evaluate_predictions(
        test_predictions["label"], test_predictions["probabilities"], names
    )
    metrics["fit_seconds"] = float(training_summary["fit_seconds"])
    metrics["trainable_parameters"] = int(training_summary.get("trainable_parameters", 0))
    report = {"strategy": strategy, **metrics}
    return (
        report,
        per_class,
        confusion_matrix_figure(matrix, names, f"{strategy}: confusion matrix (test)"),
        reliability_figure(reliability, metrics["ece"], f"{strategy}: reliability (test)"),
        mlflow_metrics(metrics),
    )
