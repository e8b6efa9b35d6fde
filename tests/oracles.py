"""Independent computations the tests compare the project's outputs with (plain numpy, written
from the definitions, sharing no code with transfer_learning)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro-F1, log-loss and 15-bin ECE from their definitions."""
    labels = np.asarray(labels)
    n_classes = probabilities.shape[1]
    predicted = probabilities.argmax(axis=1)
    confusion = np.zeros((n_classes, n_classes))
    np.add.at(confusion, (labels, predicted), 1)
    true_positives = np.diag(confusion)
    present = confusion.sum(axis=1) > 0
    recall = true_positives[present] / confusion.sum(axis=1)[present]
    precision = np.divide(
        true_positives, confusion.sum(axis=0), out=np.zeros(n_classes), where=confusion.sum(0) > 0
    )
    recall_all = np.divide(
        true_positives, confusion.sum(axis=1), out=np.zeros(n_classes), where=present
    )
    both = precision + recall_all
    f1 = np.divide(2 * precision * recall_all, both, out=np.zeros(n_classes), where=both > 0)
    confidence = probabilities.max(axis=1)
    correct = predicted == labels
    bins = np.clip(np.ceil(confidence * 15).astype(int) - 1, 0, 14)  # (k/15, (k+1)/15]
    ece = sum(
        (bins == b).mean() * abs(correct[bins == b].mean() - confidence[bins == b].mean())
        for b in range(15)
        if (bins == b).any()
    )
    chosen = np.clip(probabilities[np.arange(len(labels)), labels], 1e-15, 1)
    return {
        "accuracy": float(correct.mean()),
        "balanced_accuracy": float(recall.mean()),
        "macro_f1": float(f1.mean()),  # over every class, 0 for one never seen nor predicted
        "log_loss": float(-np.log(chosen).mean()),
        "ece": float(ece),
    }


def per_class_recall(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Share of each class's test images predicted as that class (a confusion row's diagonal)."""
    labels, predicted = np.asarray(labels), probabilities.argmax(axis=1)
    return np.array([(predicted[labels == c] == c).mean() for c in range(probabilities.shape[1])])


def colours_in_png(path, hex_colours: list[str], tolerance: int = 6) -> dict[str, int]:
    """How many pixels of the PNG at `path` have each colour (within `tolerance` per channel):
    a chart that draws a strategy's bars or line in its colour has many such pixels."""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16).reshape(-1, 3)
    found = {}
    for colour in hex_colours:
        rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.int16)
        found[colour] = int((np.abs(pixels - rgb).max(axis=1) <= tolerance).sum())
    return found
