"""A weighted combination of several models' probabilities, the weights fitted on held-out images.

Stacking at its simplest (Wolpert 1992; Caruana et al. 2004 pick weights the same way): one
weight per model on a grid over the simplex, the one whose mixture has the lowest log-loss on
images none of the models learned from. Log-loss, not accuracy: it is smooth, so a few hundred
images choose a stable weight, and it rewards the calibrated confidence the mixture keeps.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from transfer_learning.models.calibration import mean_log_loss

WEIGHT_STEP = 0.05


def simplex_grid(members: int, step: float = WEIGHT_STEP) -> np.ndarray:
    """Every weight vector of `members` non-negative multiples of `step` that sum to 1."""
    ticks = round(1 / step)
    points = [
        counts
        for counts in itertools.product(range(ticks + 1), repeat=members - 1)
        if sum(counts) <= ticks
    ]
    return np.array([[*counts, ticks - sum(counts)] for counts in points], dtype=np.float64) / ticks


def mixture(probabilities: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Σ weight · probabilities, one array per model (rows sum to 1 when the weights do)."""
    return sum(
        w * np.asarray(p, dtype=np.float64) for w, p in zip(weights, probabilities, strict=True)
    )


def choose_weights(
    probabilities: Sequence[Sequence[np.ndarray]], labels: Sequence[np.ndarray]
) -> tuple[np.ndarray, float]:
    """The weights (one per model) whose mixture has the lowest held-out log-loss, and that loss.

    `probabilities[m][k]` is model m's probabilities for task k on the held-out images,
    `labels[k]` their labels (the loss is summed over tasks). Ties go to the more even weights;
    with no held-out image every model weighs the same.
    """
    members = len(probabilities)
    if not any(len(task_labels) for task_labels in labels):
        return np.full(members, 1.0 / members), float("nan")
    grid = simplex_grid(members)
    losses = np.array(
        [
            sum(
                mean_log_loss(mixture([p[k] for p in probabilities], weights), task_labels)
                for k, task_labels in enumerate(labels)
            )
            for weights in grid
        ]
    )
    unevenness = np.abs(grid - 1.0 / members).sum(axis=1)
    best = min(range(len(grid)), key=lambda i: (round(losses[i], 12), unevenness[i]))
    return grid[best], float(losses[best])
