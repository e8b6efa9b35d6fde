import numpy as np
import pytest
from sklearn.metrics import accuracy_score, log_loss

from transfer_learning.evaluation import (
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


def test_metrics_agree_with_scikit_learn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 200)
    probabilities = rng.dirichlet(np.ones(7), 200)
    probabilities[np.arange(200), labels] += 0.5
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    metrics, per_class, reliability, matrix = evaluate_predictions(
        labels, probabilities, list("abcdefg")
    )
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, probabilities.argmax(1)))
    assert metrics["log_loss"] == pytest.approx(log_loss(labels, probabilities))
    assert metrics["n_test"] == 200 and 0 <= metrics["ece"] <= 1
    assert metrics["top5_accuracy"] >= metrics["accuracy"]
    assert matrix.sum() == 200 and list(per_class["class_name"]) == list("abcdefg")


def test_no_top5_with_five_classes_or_fewer():
    metrics, *_ = evaluate_predictions(
        np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]), ["a", "b"]
    )
    assert "top5_accuracy" not in metrics and metrics["accuracy"] == 1.0


def test_probabilities_are_aligned_to_class_ids():
    aligned = align_probabilities(np.array([[0.3, 0.7]]), [0, 2], 3)
    assert aligned.tolist() == [[0.3, 0.0, 0.7]]
