"""One evaluation for every strategy: test-split labels and class probabilities in, metrics out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

# Figures are built without pyplot: no backend, no window, no global figure registry.
from matplotlib.figure import Figure
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

ECE_BINS = 15


def align_probabilities(
    probabilities: np.ndarray, model_classes: Sequence[int], n_classes: int
) -> np.ndarray:
    """Columns in model order → one column per label id 0..n_classes-1 (absent classes get 0).

    Rows are renormalised in float64: heads fed float32 features return float32 probabilities,
    whose rows miss 1 by more than log-loss tolerates.
    """
    aligned = np.zeros((len(probabilities), n_classes), dtype=np.float64)
    aligned[:, np.asarray(model_classes, dtype=int)] = probabilities
    return aligned / aligned.sum(axis=1, keepdims=True)


def expected_calibration_error(
    labels: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS
) -> tuple[float, pd.DataFrame]:
    """ECE over equal-width confidence bins (Guo et al. 2017), and the per-bin table behind it."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin i holds confidences in (edges[i], edges[i+1]]; confidence 0 goes to the first bin.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows = []
    ece = 0.0
    for b in range(bins):
        members = which == b
        count = int(members.sum())
        accuracy = float(correct[members].mean()) if count else np.nan
        mean_confidence = float(confidence[members].mean()) if count else np.nan
        if count:
            ece += count / len(labels) * abs(accuracy - mean_confidence)
        rows.append(
            {
                "bin_low": edges[b],
                "bin_high": edges[b + 1],
                "count": count,
                "accuracy": accuracy,
                "confidence": mean_confidence,
            }
        )
    return float(ece), pd.DataFrame(rows)


def evaluate_predictions(
    labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]
) -> tuple[dict[str, float], pd.DataFrame, pd.DataFrame, np.ndarray]:
    """Metrics dict, per-class table, reliability table and confusion matrix on the test split."""
    n_classes = len(class_names)
    if probabilities.shape != (len(labels), n_classes):
        raise ValueError(
            f"Probabilities have shape {probabilities.shape}; expected ({len(labels)}, {n_classes})."
        )
    everyone = np.arange(n_classes)
    predicted = probabilities.argmax(axis=1)
    ece, reliability = expected_calibration_error(labels, probabilities)
    metrics = {
        "accuracy": float(accuracy_score(labels, predicted)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "macro_f1": float(
            f1_score(labels, predicted, average="macro", labels=everyone, zero_division=0)
        ),
        "log_loss": float(log_loss(labels, probabilities, labels=everyone)),
        "ece": ece,
        "n_test": int(len(labels)),
    }
    if n_classes > 5:
        metrics["top5_accuracy"] = float(
            top_k_accuracy_score(labels, probabilities, k=5, labels=everyone)
        )
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=everyone, zero_division=0
    )
    per_class = pd.DataFrame(
        {
            "class_name": list(class_names),
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": support,
        }
    )
    return metrics, per_class, reliability, confusion_matrix(labels, predicted, labels=everyone)


def confusion_matrices_figure(
    matrices: Mapping[str, tuple[np.ndarray, Sequence[str]]],
) -> Figure:
    """One confusion-matrix panel per title (with several tasks: one per task), side by side."""
    sizes = [max(4.0, 0.45 * len(names) + 2) for _, names in matrices.values()]
    figure = Figure(figsize=(sum(size + 1 for size in sizes), max(sizes)))
    panels = np.atleast_1d(figure.subplots(1, len(matrices), width_ratios=sizes))
    for axes, (title, (matrix, class_names)) in zip(panels, matrices.items(), strict=True):
        _confusion_panel(figure, axes, matrix, class_names, title)
    figure.tight_layout()
    return figure


def _confusion_panel(
    figure: Figure, axes: Any, matrix: np.ndarray, class_names: Sequence[str], title: str
) -> None:
    shown = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    image = axes.imshow(shown, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(class_names))
    axes.set_xticks(ticks, class_names, rotation=90)
    axes.set_yticks(ticks, class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    if len(class_names) <= 20:
        for (row, column), count in np.ndenumerate(matrix):
            axes.text(
                column,
                row,
                str(count),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if shown[row, column] > 0.5 else "black",
            )
    figure.colorbar(image, ax=axes, label="share of true class")


def reliability_figure(reliability: pd.DataFrame, ece: float, title: str) -> Figure:
    figure = Figure(figsize=(5, 5))
    axes = figure.subplots()
    centres = (reliability["bin_low"] + reliability["bin_high"]) / 2
    width = float(reliability["bin_high"].iloc[0] - reliability["bin_low"].iloc[0])
    axes.bar(
        centres, reliability["accuracy"].fillna(0), width=width, edgecolor="black", label="accuracy"
    )
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    axes.set_xlabel("confidence")
    axes.set_ylabel("accuracy")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_title(f"{title} (ECE {ece:.3f})")
    axes.legend(loc="upper left")
    figure.tight_layout()
    return figure
