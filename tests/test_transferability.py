"""Each transferability score against a direct, slow computation from its paper's definition."""

import numpy as np
import pytest
from scipy.stats import multivariate_normal
from sklearn.covariance import LedoitWolf
from sklearn.datasets import load_digits

from transfer_learning.features.transferability import (
    h_score,
    knn_accuracy,
    leep,
    logme,
    logme_evidence,
    nce,
)


def small_problem(n=60, d=8, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centres = rng.normal(size=(classes, d))
    return centres[labels] + rng.normal(scale=1.5, size=(n, d)), labels


def marginal_likelihood(features, y, alpha, beta):
    """log N(y; 0, F Fᵀ/α + I/β): the evidence of the Bayesian linear model, in closed form."""
    covariance = features @ features.T / alpha + np.eye(len(y)) / beta
    return multivariate_normal(mean=np.zeros(len(y)), cov=covariance).logpdf(y)


@pytest.mark.parametrize(("n", "d"), [(60, 8), (20, 50)])  # more images than dimensions, and fewer
def test_logme_evidence_is_the_maximised_marginal_likelihood(n, d):
    features, labels = small_problem(n, d)
    y = (labels == 1).astype(float)
    u, sigma, _ = np.linalg.svd(features, full_matrices=False)
    evidence, alpha, beta = logme_evidence(u, sigma**2, d, y)
    # float64: the library works in the SVD's basis, the oracle factorises an n × n covariance.
    assert evidence == pytest.approx(marginal_likelihood(features, y, alpha, beta), rel=1e-9)
    # (α, β) is the fixed point of evidence maximisation: every nearby pair has less evidence.
    for a, b in [(1.3, 1), (1 / 1.3, 1), (1, 1.3), (1, 1 / 1.3)]:
        assert marginal_likelihood(features, y, alpha * a, beta * b) < evidence


def test_logme_averages_the_classes_per_image():
    features, labels = small_problem()
    u, sigma, _ = np.linalg.svd(features, full_matrices=False)
    per_class = [logme_evidence(u, sigma**2, 8, (labels == k).astype(float))[0] for k in range(3)]
    assert logme(features, labels) == pytest.approx(np.mean(per_class) / len(labels))


def test_scores_prefer_informative_features_to_noise():
    digits = load_digits()
    features, labels = digits.data[:600], digits.target[:600]
    noise = np.random.default_rng(0).normal(size=features.shape)
    assert logme(features, labels) > logme(noise, labels)
    assert h_score(features, labels) > h_score(noise, labels)
    assert knn_accuracy(features, labels) > 0.9 > 0.3 > knn_accuracy(noise, labels)


@pytest.mark.parametrize(("n", "d"), [(40, 30), (20, 50)])
def test_h_score_matches_its_definition(n, d):
    features, labels = small_problem(n, d)
    centred = features - features.mean(axis=0)
    shrunk = LedoitWolf(assume_centered=True).fit(centred)
    class_means = {k: centred[labels == k].mean(axis=0) for k in np.unique(labels)}
    between = np.zeros((d, d))
    for label in labels:
        between += np.outer(class_means[label], class_means[label]) / len(labels)
    expected = np.trace(np.linalg.inv(shrunk.covariance_) @ ((1 - shrunk.shrinkage_) * between))
    # float64: the oracle inverts the shrunk covariance, the library works in its eigenbasis
    # (with a subtraction for the part outside the span); rounding stays far below rel 1e-8.
    assert h_score(features, labels) == pytest.approx(expected, rel=1e-8)


def test_nce_is_minus_the_conditional_entropy():
    rng = np.random.default_rng(1)
    source, labels = rng.integers(0, 7, size=200), rng.integers(0, 3, size=200)
    expected = 0.0
    for z in np.unique(source):
        p_z = np.mean(source == z)
        for y in np.unique(labels):
            p_zy = np.mean((source == z) & (labels == y))
            if p_zy > 0:
                expected += p_zy * np.log(p_zy / p_z)
    assert nce(source, labels) == pytest.approx(expected)
    assert nce(labels * 5 + 2, labels) == pytest.approx(0.0)  # Z determines Y


def test_leep_matches_its_definition():
    rng = np.random.default_rng(2)
    logits, labels = rng.normal(size=(50, 6)) * 2, rng.integers(0, 3, size=50)
    theta = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    joint = np.zeros((6, 3))
    for i in range(50):
        joint[:, labels[i]] += theta[i] / 50
    expected = np.mean(
        [
            np.log(sum(joint[z, labels[i]] / joint[z].sum() * theta[i, z] for z in range(6)))
            for i in range(50)
        ]
    )
    assert leep(logits, labels) == pytest.approx(expected)


@pytest.mark.parametrize("noise", [0.1, 1e-3])
def test_logme_stays_finite_when_fewer_images_than_dimensions_fit_the_labels(noise):
    """25 images a class, 1,280 dimensions that all but name the class (a few photos a class on
    a large backbone): the evidence's updates reach a perfect fit and once divided by zero."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 25)
    informative = np.zeros((125, 1280))
    informative[np.arange(125), labels] = 10.0
    informative += noise * rng.normal(size=informative.shape)
    score = logme(informative, labels)
    assert np.isfinite(score)
    assert score > logme(rng.normal(size=(125, 1280)), labels)
