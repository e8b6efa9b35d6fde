"""Temperature scaling (Guo et al. 2017): one scalar per task that makes confidences honest.

Every strategy's probabilities p are recalibrated as softmax(log p / T). For a network,
log p is its logits up to a constant, so this is the classic logits / T; for a scikit-learn head
it is the same operation on the head's log-probabilities. T is fitted by minimising the
log-loss on images the model did not learn from (val, or out-of-fold predictions on train+val),
so accuracy never changes: argmax is invariant to T.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

# Probabilities of exactly 0 (a prototype or k-NN head) would give log 0 = -inf and an infinite
# log-loss whatever T is; they are floored here, far below any confidence a report shows.
_FLOOR = 1e-12
# T outside this range means the held-out predictions are degenerate (all right or all wrong).
TEMPERATURE_RANGE = (0.05, 20.0)


def log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities, floored so that zeros stay finite."""
    return np.log(np.clip(np.asarray(probabilities, dtype=np.float64), _FLOOR, 1.0))


def mean_log_loss(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (0 with no image): what T and a
    combination's weights minimise."""
    labels = np.asarray(labels, dtype=np.int64)
    if not len(labels):
        return 0.0
    return float(-log_probabilities(probabilities)[np.arange(len(labels)), labels].mean())


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): T > 1 softens over-confident probabilities, T < 1 sharpens."""
    if temperature == 1.0:
        return np.asarray(probabilities, dtype=np.float64)
    return np.exp(log_softmax(log_probabilities(probabilities) / temperature, axis=1))


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The T that minimises the log-loss of `apply_temperature(probabilities, T)` on `labels`.

    One parameter, fitted on log T (the loss is smooth and unimodal there); with no held-out
    image, or one class only, there is nothing to fit and T stays 1.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0 or len(np.unique(labels)) < 2:
        return 1.0
    logs = log_probabilities(probabilities)
    rows = np.arange(len(labels))

    def loss(log_temperature: float) -> float:
        scaled = log_softmax(logs / np.exp(log_temperature), axis=1)
        return float(-scaled[rows, labels].mean())

    low, high = np.log(TEMPERATURE_RANGE)
    result = minimize_scalar(loss, bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    # Never worse on the held-out images than no scaling (the search stops within a tolerance).
    return float(np.exp(result.x)) if result.fun < loss(0.0) else 1.0
