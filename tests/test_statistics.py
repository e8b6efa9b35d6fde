"""Intervals, paired tests and the recommendation, against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from transfer_learning.reporting.statistics import (
    PairedComparison,
    bootstrap_intervals,
    detectable_difference,
    holm,
    images_needed,
    mcnemar_exact,
    paired_comparison,
    recommendation,
)


def test_intervals_equal_a_direct_bootstrap_with_scikit_learns_metrics():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 120)
    predicted = np.where(rng.random(120) < 0.7, labels, rng.integers(0, 4, 120))
    intervals = bootstrap_intervals(labels, predicted, 4, resamples=300, seed=11)
    # The oracle: the same seeded resamples, each scored by scikit-learn.
    positions = np.random.default_rng(11).integers(0, 120, size=(300, 120))
    everyone = np.arange(4)
    scores = {
        "accuracy": [accuracy_score(labels[p], predicted[p]) for p in positions],
        "balanced_accuracy": [balanced_accuracy_score(labels[p], predicted[p]) for p in positions],
        "macro_f1": [
            f1_score(labels[p], predicted[p], average="macro", labels=everyone, zero_division=0)
            for p in positions
        ],
    }
    for name, values in scores.items():
        # Confusion-matrix formulas vs scikit-learn's, float64 ratios of counts: a few roundings.
        assert intervals[name] == pytest.approx(np.percentile(values, [2.5, 97.5]), abs=1e-12)
        assert intervals[name][0] < accuracy_score(labels, predicted) + 0.5


def test_an_interval_narrows_as_the_test_set_grows():
    rng = np.random.default_rng(0)
    widths = []
    for n in (100, 10_000):
        labels = rng.integers(0, 10, n)
        predicted = np.where(rng.random(n) < 0.9, labels, (labels + 1) % 10)
        low, high = bootstrap_intervals(labels, predicted, 10, seed=0)["accuracy"]
        # About a binomial proportion's normal interval, 2 × 1.96 × sqrt(p(1 - p) / n).
        accuracy = (predicted == labels).mean()
        assert high - low == pytest.approx(3.92 * math.sqrt(accuracy * (1 - accuracy) / n), rel=0.2)
        widths.append(high - low)
    assert widths[1] < widths[0] / 5


def direct_mcnemar(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar by summing the binomial distribution (an oracle, no scipy)."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(a_only, b_only) + 1)) / 2**n
    return min(1.0, 2 * tail)


@pytest.mark.parametrize("a_only,b_only", [(0, 0), (1, 0), (3, 1), (10, 2), (40, 12), (7, 7)])
def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_images(a_only, b_only):
    # scipy's binomial tail vs an exact integer sum, one division: approx's rel 1e-6 is ample.
    assert mcnemar_exact(a_only, b_only) == pytest.approx(direct_mcnemar(a_only, b_only))


def strategies_differing_by(n_images: int, extra_right: int, seed: int = 0):
    """Labels and two strategies' predictions: both right on the same 85 % of the images, and a
    right on `extra_right` images more."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, n_images)
    both = rng.random(n_images) < 0.85
    predicted_b = np.where(both, labels, (labels + 1) % 5)
    predicted_a = predicted_b.copy()
    wrong = np.flatnonzero(~both)[:extra_right]
    predicted_a[wrong] = labels[wrong]
    return labels, predicted_a, predicted_b


def test_one_image_apart_is_not_significant_many_are():
    labels, a, b = strategies_differing_by(150, 1)
    close = paired_comparison(("a", "b"), labels, a, b, seed=0)
    assert close.accuracy_difference == pytest.approx(1 / 150)
    assert (close.a_only_right, close.b_only_right) == (1, 0)
    assert close.p_value == 1.0 and close.interval[0] <= 0 <= close.interval[1]
    labels, a, b = strategies_differing_by(1000, 60)
    far = paired_comparison(("a", "b"), labels, a, b, seed=0)
    assert far.accuracy_difference == pytest.approx(0.06)
    assert far.p_value == pytest.approx(direct_mcnemar(60, 0)) and far.p_value < 1e-15
    assert 0 < far.interval[0] < 0.06 < far.interval[1]


def test_the_paired_interval_is_a_direct_paired_bootstrap():
    labels, a, b = strategies_differing_by(200, 9, seed=4)
    result = paired_comparison(("a", "b"), labels, a, b, resamples=500, seed=2)
    positions = np.random.default_rng(2).integers(0, 200, size=(500, 200))
    differences = [(a[p] == labels[p]).mean() - (b[p] == labels[p]).mean() for p in positions]
    # Differences of float64 means of 0/1 values computed apart: a few roundings.
    assert result.interval == pytest.approx(np.percentile(differences, [2.5, 97.5]), abs=1e-12)


def test_holm_adjustment():
    # Worked example: p = (0.01, 0.04, 0.03) → sorted 0.01·3, 0.03·2, max(0.06, 0.04·1).
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def test_detectable_difference_and_images_needed_agree():
    # Strategies that disagree on 10 % of the images.
    needed = images_needed(0.01, 0.10)
    assert 7_000 < needed < 9_000  # Connor's formula, α 0.05, power 0.8: about 7,800
    # images_needed rounds up to whole images (about 7,800): the inverse is off by < 1e-4 rel.
    assert detectable_difference(needed, 0.10) == pytest.approx(0.01, rel=1e-3)
    smaller = detectable_difference(300, 0.10)
    assert 0.04 < smaller < 0.07  # a few hundred test images detect only several points
    assert images_needed(0.2, 0.1) is None  # more than the disagreement cannot arise
    assert detectable_difference(300, 0.0) is None


def summary(accuracy: float, seconds: float) -> dict:
    return {"accuracy": accuracy, "fit_seconds": seconds, "predict_seconds": 1.0}


def test_the_recommendation_is_the_cheapest_strategy_not_significantly_worse():
    summaries = {"cheap": summary(0.94, 2), "costly": summary(0.95, 300), "bad": summary(0.6, 1)}
    pairwise = [
        PairedComparison("costly", "cheap", 0.01, [-0.01, 0.03], 4, 2, 0.69, p_value_holm=0.69),
        PairedComparison("costly", "bad", 0.35, [0.3, 0.4], 60, 0, 1e-18, p_value_holm=3e-18),
        PairedComparison("cheap", "bad", 0.34, [0.3, 0.4], 58, 0, 1e-17, p_value_holm=2e-17),
    ]
    chosen = recommendation(summaries, pairwise)
    assert chosen["strategy"] == "cheap" and chosen["most_accurate"] == "costly"
    assert "not significantly below costly" in chosen["reason"]
    significant = [
        PairedComparison("costly", "cheap", 0.01, [0.005, 0.02], 40, 2, 1e-9, p_value_holm=2e-9),
        *pairwise[1:],
    ]
    chosen = recommendation(summaries, significant)
    assert chosen["strategy"] == "costly"
    assert "every cheaper strategy is significantly less accurate" in chosen["reason"]
