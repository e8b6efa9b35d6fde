import math

import numpy as np
import pytest

from transfer_learning.reporting.evaluation import (
    align_probabilities,
    evaluate_predictions,
    expected_calibration_error,
)


def test_ece_of_a_perfectly_calibrated_and_an_overconfident_model():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    # Confidence 0.8 everywhere, 8 of 10 right: calibrated.
    calibrated = np.tile([0.2, 0.8], (10, 1))
    calibrated_labels = np.array([1] * 8 + [0] * 2)
    assert expected_calibration_error(calibrated_labels, calibrated)[0] == pytest.approx(0.0)
    # Confidence 1.0, 6 of 10 right: ECE is 0.4.
    overconfident = np.tile([0.0, 1.0], (10, 1))
    ece, table = expected_calibration_error(labels, overconfident)
    assert ece == pytest.approx(0.4)
    assert table["count"].sum() == 10 and len(table) == 15


# Six test images, three classes; predictions 0, 1, 1, 1, 2, 0 (two wrong: rows 1 and 5).
LABELS = np.array([0, 0, 1, 1, 2, 2])
PROBABILITIES = np.array(
    [
        [0.70, 0.20, 0.10],
        [0.39, 0.51, 0.10],
        [0.10, 0.78, 0.12],
        [0.20, 0.58, 0.22],
        [0.29, 0.29, 0.42],
        [0.52, 0.24, 0.24],
    ]
)


def test_metrics_equal_values_computed_by_hand():
    metrics, per_class, _, matrix = evaluate_predictions(LABELS, PROBABILITIES, ["a", "b", "c"])
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    # Recall per class 1/2, 2/2, 1/2.
    assert metrics["balanced_accuracy"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    # Precision per class 1/2, 2/3, 1/1 → F1 0.5, 0.8, 2/3.
    assert per_class["precision"].tolist() == pytest.approx([0.5, 2 / 3, 1.0])
    assert per_class["f1"].tolist() == pytest.approx([0.5, 0.8, 2 / 3])
    assert metrics["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    true_class_probability = [0.70, 0.39, 0.78, 0.58, 0.42, 0.24]
    assert metrics["log_loss"] == pytest.approx(-sum(map(math.log, true_class_probability)) / 6)
    # Confidence bins (width 1/15): 0.70 right; 0.51 and 0.52 both wrong; 0.78, 0.58, 0.42 right.
    assert metrics["ece"] == pytest.approx((0.30 + 2 * 0.515 + 0.22 + 0.42 + 0.58) / 6)
    assert matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert per_class["support"].tolist() == [2, 2, 2] and metrics["n_test"] == 6


def test_top5_counts_the_true_class_among_the_five_most_probable():
    probabilities = np.tile(np.arange(7, dtype=float)[::-1] + 1, (2, 1))  # class 0 most probable
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    # Class 4 is fifth most probable (in the top 5, not top 1); class 0 is first.
    metrics, *_ = evaluate_predictions(np.array([4, 0]), probabilities, list("abcdefg"))
    assert metrics["top5_accuracy"] == 1.0 and metrics["accuracy"] == 0.5
    metrics, *_ = evaluate_predictions(np.array([5, 0]), probabilities, list("abcdefg"))
    assert metrics["top5_accuracy"] == 0.5


def test_no_top5_with_five_classes_or_fewer():
    metrics, *_ = evaluate_predictions(
        np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]), ["a", "b"]
    )
    assert "top5_accuracy" not in metrics and metrics["accuracy"] == 1.0


def test_probabilities_are_aligned_to_class_ids():
    aligned = align_probabilities(np.array([[0.3, 0.7]]), [0, 2], 3)
    assert aligned.tolist() == [[0.3, 0.0, 0.7]]
    # float32 rows that miss 1 by rounding come back summing to 1 in float64.
    rounded = align_probabilities(np.array([[0.1, 0.2, 0.7]], dtype=np.float32), [0, 1, 2], 3)
    assert rounded.dtype == np.float64 and rounded.sum() == pytest.approx(1.0, abs=1e-15)
