"""`evaluation.seeds`: every strategy trained with several seeds, and intervals and paired tests
that cover the seed as well as the test images."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from tests.test_comparison import run_comparison, scored
from transfer_learning.pipelines.evaluation.nodes import evaluate_test_predictions
from transfer_learning.pipelines.feature_transfer.nodes import fit_other_seeds, split_features
from transfer_learning.reporting.statistics import (
    MCNEMAR,
    SEEDS_BOOTSTRAP,
    EvaluationSettings,
    bootstrap_intervals,
    paired_comparison,
)


def seeds_of(labels: np.ndarray, accuracies: list[float], seed: int = 0) -> np.ndarray:
    """(seeds × images) predicted labels, the k-th seed right on a share `accuracies[k]`."""
    rng = np.random.default_rng(seed)
    return np.stack(
        [np.where(rng.random(len(labels)) < a, labels, (labels + 1) % 4) for a in accuracies]
    )


def test_the_settings_name_the_other_seeds_and_refuse_bad_counts():
    assert EvaluationSettings.from_params({}).other_seeds(42) == []
    assert EvaluationSettings.from_params({"seeds": 3}).other_seeds(42) == [43, 44]
    for bad in (0, 2.5, "3", True):
        with pytest.raises(ValueError, match=r"evaluation\.seeds must be a whole number"):
            EvaluationSettings.from_params({"seeds": bad})
    with pytest.raises(ValueError, match=r"evaluation\.seed\b.*known: evaluation\.seeds"):
        EvaluationSettings.from_params({"seed": 3})


def test_seed_intervals_equal_a_direct_two_level_bootstrap_with_scikit_learns_metrics():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 4, 150)
    predicted = seeds_of(labels, [0.9, 0.6, 0.75])
    intervals = bootstrap_intervals(labels, predicted, 4, resamples=200, seed=11)
    # The oracle: the same seeded draws of images, then of seeds (with replacement), each
    # resample's metric the mean over its drawn seeds, computed by scikit-learn.
    positions = np.random.default_rng(11).integers(0, 150, size=(200, 150))
    drawn = np.random.default_rng([11, 3]).integers(0, 3, size=(200, 3))
    everyone = np.arange(4)
    metrics = {
        "accuracy": accuracy_score,
        "balanced_accuracy": balanced_accuracy_score,
        "macro_f1": lambda y, p: f1_score(y, p, average="macro", labels=everyone, zero_division=0),
    }
    for name, metric in metrics.items():
        values = [
            np.mean([metric(labels[p], predicted[s][p]) for s in seeds])
            for p, seeds in zip(positions, drawn, strict=True)
        ]
        # Confusion-matrix formulas vs scikit-learn's, float64 means of ratios: a few roundings.
        assert intervals[name] == pytest.approx(np.percentile(values, [2.5, 97.5]), abs=1e-12)


def test_identical_seeds_add_nothing_and_differing_seeds_widen_the_interval():
    labels = np.random.default_rng(0).integers(0, 4, 2000)
    one = seeds_of(labels, [0.8])
    alone = bootstrap_intervals(labels, one[0], 4)["accuracy"]
    same = bootstrap_intervals(labels, np.vstack([one, one, one]), 4)["accuracy"]
    # The mean of three equal float64 values can miss the value by an ulp.
    assert same == pytest.approx(alone, abs=1e-12)
    spread = bootstrap_intervals(labels, seeds_of(labels, [0.7, 0.8, 0.9]), 4)["accuracy"]
    assert spread[1] - spread[0] > 3 * (alone[1] - alone[0])
    assert spread[0] < 0.8 < spread[1]


def test_with_seeds_the_paired_test_is_the_bootstrap_and_sees_what_mcnemar_cannot():
    """Deployed models 5 points apart on 2,000 images: McNemar calls it significant. Their
    other seeds show that a's seed matters more than that: with them, it is not."""
    labels = np.random.default_rng(1).integers(0, 4, 2000)
    a = seeds_of(labels, [0.85, 0.72, 0.95], seed=2)
    b = seeds_of(labels, [0.80, 0.81, 0.79], seed=3)
    deployed = paired_comparison(("a", "b"), labels, a[0], b[0])
    assert deployed.test == MCNEMAR and deployed.p_value < 1e-3
    seeded = paired_comparison(("a", "b"), labels, a, b)
    assert seeded.test == SEEDS_BOOTSTRAP and seeded.p_value > 0.05
    right_a, right_b = (a == labels).mean(), (b == labels).mean()
    assert seeded.accuracy_difference == pytest.approx(right_a - right_b)
    assert seeded.interval[0] < 0 < seeded.interval[1]
    # The discordant counts stay the deployed models'.
    assert (seeded.a_only_right, seeded.b_only_right) == (
        deployed.a_only_right,
        deployed.b_only_right,
    )
    # Seeds that agree leave a real difference significant.
    steady = seeds_of(labels, [0.86, 0.85, 0.87], seed=4)
    assert paired_comparison(("a", "b"), labels, steady, b).p_value < 0.01


def test_the_evaluation_reports_the_mean_over_seeds_and_each_seeds_figures():
    labels = np.random.default_rng(2).integers(0, 4, 400)
    predicted = seeds_of(labels, [0.9, 0.7, 0.8])
    probabilities = np.full((400, 4), 0.1)
    probabilities[np.arange(400), predicted[0]] = 0.7
    test_predictions = {"label": labels, "probabilities": probabilities}
    summary = {"fit_seconds": 2.0}
    classes = {"classes": list("abcd")}
    once, per_class, *_ = evaluate_test_predictions(
        test_predictions, {"seeds": np.empty(0)}, summary, classes, strategy="s"
    )
    thrice, per_class_thrice, *_, logged, _ = evaluate_test_predictions(
        test_predictions,
        {"seeds": np.array([43, 44]), "predicted_0": predicted[1:]},
        summary,
        classes,
        strategy="s",
    )
    assert once["seeds"] == {"count": 1}
    assert once["accuracy"] == pytest.approx(accuracy_score(labels, predicted[0]))
    per_seed = [accuracy_score(labels, row) for row in predicted]
    assert thrice["seeds"]["count"] == 3 and thrice["seeds"]["other_seeds"] == [43, 44]
    assert thrice["seeds"]["accuracy"] == pytest.approx(per_seed)
    assert thrice["accuracy"] == pytest.approx(np.mean(per_seed))
    assert thrice["accuracy_interval"][0] < np.mean(per_seed) < thrice["accuracy_interval"][1]
    width = np.diff(thrice["accuracy_interval"])[0]
    assert width > 2 * np.diff(once["accuracy_interval"])[0]
    # What only one model has stays the deployed model's.
    assert thrice["ece"] == once["ece"]
    assert per_class_thrice.equals(per_class)
    assert logged["seeds"]["value"] == 3.0


def test_the_comparison_says_which_strategies_had_several_seeds():
    labels = np.random.default_rng(3).integers(0, 5, 300)
    strategies = [
        scored("cheap", labels, np.where(np.arange(300) % 10 == 0, (labels + 1) % 5, labels), 2),
        scored("costly", labels, labels, 300.0),
    ]
    others = [
        {"seeds": np.array([43]), "predicted_0": (labels + (np.arange(300) % 4 == 0))[None] % 5},
        {"seeds": np.empty(0)},
    ]
    strategies[0][0]["seeds"] = {"count": 2}
    markdown, _, record, _ = run_comparison(strategies, others)
    assert "Trained with several seeds (cheap 2; `evaluation.seeds`)" in markdown
    assert [pair["test"] for pair in record["pairwise"]] == [SEEDS_BOOTSTRAP]
    assert "| paired-bootstrap (seeds × images) |" in markdown
    assert record["strategies"]["cheap"]["seeds"] == {"count": 2}


def test_the_head_is_fitted_again_for_each_other_seed_and_calibrated():
    digits = load_digits()
    n = 600
    features = {
        "features": digits.data[:n].astype(np.float32),
        "label": digits.target[:n].astype(np.int64),
        "split": np.array(["train", "val", "test"])[np.arange(n) % 3],
        "location": np.array([f"sklearn-digits:{i}" for i in range(n)]),
        "image_size": np.array(8),
    }
    train, val = split_features(features)
    head = {"type": "logistic_regression", "grid": {"C": [0.1, 1.0]}, "selection": "cv"}
    others = fit_other_seeds(
        train,
        val,
        {"classes": [str(d) for d in range(10)]},
        head,
        7,
        {"name": "efficientnet_lite0", "image_size": 32},
        {"seeds": 3},
    )
    assert [other["seed"] for other in others] == [8, 9]
    for other in others:
        assert other["image_model"].strategy == "feature_transfer"
        assert other["image_model"].temperatures["class"] != 1.0
        assert len(other["held_out_predictions"]["label"]) == 400  # out-of-fold on train+val
    # The seed moves the cross-validation folds, so the held-out predictions differ.
    assert not np.array_equal(
        others[0]["held_out_predictions"]["probabilities"],
        others[1]["held_out_predictions"]["probabilities"],
    )
