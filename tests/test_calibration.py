"""Temperature scaling and the weighted combination of models, against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import log_softmax, softmax

from transfer_learning.models.calibration import apply_temperature, fit_temperature
from transfer_learning.models.combination import choose_weights, mixture, simplex_grid
from transfer_learning.reporting.evaluation import expected_calibration_error


def overconfident(n: int, true_temperature: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z); the model reports softmax(z · T): over-confident by T."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, size=(n, 5))
    truth = softmax(logits, axis=1)
    labels = np.array([rng.choice(5, p=row) for row in truth])
    return softmax(logits * true_temperature, axis=1), labels


def test_the_fitted_temperature_recovers_the_over_confidence_and_fixes_ece_on_new_images():
    reported, labels = overconfident(20_000, 3.0, seed=0)
    temperature = fit_temperature(reported, labels)
    assert temperature == pytest.approx(3.0, rel=0.05)
    fresh, fresh_labels = overconfident(20_000, 3.0, seed=1)
    before = expected_calibration_error(fresh_labels, fresh)[0]
    after = expected_calibration_error(fresh_labels, apply_temperature(fresh, temperature))[0]
    assert before > 0.1 and after < 0.01
    # Under-confident probabilities get T < 1.
    shy, shy_labels = overconfident(20_000, 0.5, seed=2)
    assert fit_temperature(shy, shy_labels) == pytest.approx(0.5, rel=0.05)


def test_the_temperature_is_the_log_loss_minimum_and_never_changes_a_prediction():
    reported, labels = overconfident(2_000, 2.0, seed=3)
    temperature = fit_temperature(reported, labels)

    def loss(t: float) -> float:  # computed here from scipy's log_softmax, not the module
        return -log_softmax(np.log(reported) / t, axis=1)[np.arange(len(labels)), labels].mean()

    grid = np.linspace(0.5, 5, 4_501)
    # An approximation both sides: the grid's step is 1e-3, the fit's xatol 1e-4 on log T.
    assert temperature == pytest.approx(grid[np.argmin([loss(t) for t in grid])], abs=2e-3)
    calibrated = apply_temperature(reported, temperature)
    # Two float64 routes (exp of log_softmax vs softmax): numpy's default rtol 1e-7 is ample.
    np.testing.assert_allclose(calibrated, softmax(np.log(reported) / temperature, axis=1))
    np.testing.assert_array_equal(calibrated.argmax(axis=1), reported.argmax(axis=1))
    # Undoing it (what evaluation does to report the ECE before calibration) is exact.
    np.testing.assert_allclose(apply_temperature(calibrated, 1 / temperature), reported, atol=1e-12)


def test_nothing_to_fit_keeps_the_temperature_at_one_and_zeros_stay_finite():
    assert fit_temperature(np.eye(3)[[0, 0]], np.array([0, 0])) == 1.0
    assert fit_temperature(np.empty((0, 3)), np.empty(0, dtype=int)) == 1.0
    # A k-NN head's hard zeros, wrong once: the loss stays finite and T is in range.
    hard = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    temperature = fit_temperature(hard, np.array([0, 1, 1, 1]))
    assert np.isfinite(temperature) and 0.05 <= temperature <= 20
    assert np.isfinite(apply_temperature(hard, temperature)).all()


def test_the_simplex_grid_holds_every_weight_vector_once():
    grid = simplex_grid(3)
    assert len(grid) == 231  # C(20 + 2, 2) points of step 0.05 on the 3-model simplex
    np.testing.assert_allclose(grid.sum(axis=1), 1.0)
    assert len({tuple(row) for row in np.round(grid, 6)}) == 231
    assert grid.min() >= 0


def test_the_weights_favour_the_informative_model_and_split_evenly_between_twins():
    reported, labels = overconfident(3_000, 1.0, seed=4)  # well calibrated and informative
    uniform = np.full_like(reported, 0.2)
    weights, loss = choose_weights([[reported], [uniform]], [labels])
    assert weights[0] >= 0.9
    expected = -np.log(mixture([reported, uniform], weights)[np.arange(3_000), labels]).mean()
    assert loss == pytest.approx(expected)
    # Two identical models: every mixture is the same; the tie goes to equal weights.
    twins, _ = choose_weights([[reported], [reported]], [labels])
    np.testing.assert_allclose(twins, [0.5, 0.5])
    # Two models wrong on different images: the mixture beats either alone.
    rng = np.random.default_rng(5)
    truth = rng.integers(0, 2, 400)
    confident = np.eye(2)[truth] * 0.8 + 0.1
    first, second = confident.copy(), confident.copy()
    first[:100] = first[:100, ::-1]
    second[100:200] = second[100:200, ::-1]
    weights, loss = choose_weights([[first], [second]], [truth])
    np.testing.assert_allclose(weights, [0.5, 0.5])
    alone = -np.log(first[np.arange(400), truth]).mean()
    assert loss < alone
