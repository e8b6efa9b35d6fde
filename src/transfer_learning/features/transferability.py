"""Transferability scores: how well a frozen network's features suit a labelled data set,
estimated in seconds from the features alone, without training a head (higher is better).

Each score follows its paper:
- LogME (You et al. 2021, "LogME: Practical Assessment of Pre-trained Models for Transfer
  Learning"): the log marginal likelihood (evidence) of a Bayesian linear model from features to
  each one-hot label column, maximised over its prior and noise precisions by the paper's
  fixed-point iteration on the features' singular values; averaged over classes, per image.
- H-score (Bao et al. 2019) with the shrinkage of Ibrahim et al. 2022: tr(cov(f)⁻¹ cov(E[f|y])),
  the feature covariance estimated by Ledoit-Wolf shrinkage so that it stays well conditioned
  when images are few compared with feature dimensions.
- NCE (Tran et al. 2019): the negative conditional entropy −H(Y|Z) of the target labels Y given
  the network's own ImageNet predictions Z.
- LEEP (Nguyen et al. 2020): the mean log-likelihood of the target labels under the "expected
  empirical predictor" built from the network's ImageNet probabilities.
- kNN: stratified k-fold accuracy of a cosine k-nearest-neighbour classifier.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp, softmax
from sklearn.covariance import ledoit_wolf_shrinkage
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier

# The fixed point is reached when α/β moves by less than this (relative); the paper uses 1e-2
# and 11 iterations, a tighter tolerance costs microseconds on the singular values.
_LOGME_TOLERANCE = 1e-6
_LOGME_MAX_ITERATIONS = 1000


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME: mean over classes of the per-image maximum evidence log p(y_k | F, α*, β*)."""
    f = np.asarray(features, dtype=np.float64)
    n, d = f.shape
    u, s = _left_singular(f)
    evidences = [
        logme_evidence(u, s, d, (labels == k).astype(np.float64))[0] for k in np.unique(labels)
    ]
    return float(np.mean(evidences)) / n


def _left_singular(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """F's left singular vectors and squared singular values (the non-zero ones), from the
    eigen-decomposition of the smaller Gram matrix: several times faster than an SVD."""
    n, d = f.shape
    if n <= d:
        s, u = np.linalg.eigh(f @ f.T)
    else:
        s, v = np.linalg.eigh(f.T @ f)
    keep = s > s.max() * 1e-12
    s = s[keep]
    if n > d:
        u = f @ v[:, keep] / np.sqrt(s)
    else:
        u = u[:, keep]
    return u, s


def logme_evidence(
    u: np.ndarray, s: np.ndarray, d: int, y: np.ndarray
) -> tuple[float, float, float]:
    """Maximum log evidence of y = F w + noise, w ~ N(0, I/α), noise ~ N(0, I/β), and (α, β).

    F = U diag(√s) Vᵀ is given by its thin SVD (u, s) and its width d. Everything is computed in
    the r = len(s) dimensional span of the features, which is exact: the other d − r directions
    only contribute log α each to log|A|.
    """
    n = len(y)
    projected = u.T @ y  # y in the basis of F's left singular vectors
    outside = float(y @ y - projected @ projected)  # the part of y no w can fit
    alpha, beta = 1.0, 1.0
    for _ in range(_LOGME_MAX_ITERATIONS):
        shrink = beta * s / (alpha + beta * s)
        gamma = float(shrink.sum())  # effective number of parameters
        m_squared = float(np.sum(shrink**2 * projected**2 / s))  # |m|², m the posterior mean
        residual = float(np.sum(((1 - shrink) * projected) ** 2)) + outside  # |y − F m|²
        if not (m_squared > 0 and residual > 0 and n - gamma > 0):
            # A (numerically) perfect fit, as with fewer images than feature dimensions: the
            # updates would divide by zero; the last finite α, β are kept.
            break
        new_alpha, new_beta = gamma / m_squared, (n - gamma) / residual
        converged = abs(new_alpha / new_beta - alpha / beta) <= _LOGME_TOLERANCE * alpha / beta
        alpha, beta = new_alpha, new_beta
        if converged:
            break
    shrink = beta * s / (alpha + beta * s)
    m_squared = float(np.sum(shrink**2 * projected**2 / s))
    residual = float(np.sum(((1 - shrink) * projected) ** 2)) + outside
    log_det_a = float(np.sum(np.log(alpha + beta * s))) + (d - len(s)) * np.log(alpha)
    evidence = (
        d / 2 * np.log(alpha)
        + n / 2 * np.log(beta)
        - beta / 2 * residual
        - alpha / 2 * m_squared
        - log_det_a / 2
        - n / 2 * np.log(2 * np.pi)
    )
    return float(evidence), alpha, beta


def h_score(features: np.ndarray, labels: np.ndarray) -> float:
    """Shrinkage H-score: tr(Σ_f⁻¹ (1 − ρ) Σ_g), Σ_f Ledoit-Wolf with shrinkage ρ, g = E[f | y]."""
    f = np.asarray(features, dtype=np.float64)
    f = f - f.mean(axis=0)
    n, d = f.shape
    rho = ledoit_wolf_shrinkage(f, assume_centered=True)
    # Σ_f = (1 − ρ) S + ρ μ I with S = fᵀf / n = V diag(λ) Vᵀ, inverted in S's eigenbasis; the
    # directions outside the span of f (when n < d) have λ = 0.
    u, s = _left_singular(f)
    eigenvalues = s / n
    mu = eigenvalues.sum() / d
    # tr(Σ_f⁻¹ Σ_g) = Σ_k n_k / n · m_kᵀ Σ_f⁻¹ m_k, m_k the class means, split into their
    # coordinates along S's eigenvectors v_j = fᵀ u_j / √s_j and the rest (eigenvalue 0).
    outside_weight = 1 / (rho * mu) if rho * mu > 0 else 0.0
    total = 0.0
    for k in np.unique(labels):
        mean = f[labels == k].mean(axis=0)
        inside = (f @ mean) @ u / np.sqrt(s)  # the mean's coordinates along V
        outside = max(float(mean @ mean - inside @ inside), 0.0)
        quadratic = (
            np.sum(inside**2 / ((1 - rho) * eigenvalues + rho * mu)) + outside * outside_weight
        )
        total += np.mean(labels == k) * quadratic
    return float((1 - rho) * total)


def nce(source_predictions: np.ndarray, labels: np.ndarray) -> float:
    """NCE: −H(Y | Z), Z the network's own top-1 class of each image (≤ 0, 0 is best)."""
    _, z = np.unique(source_predictions, return_inverse=True)
    _, y = np.unique(labels, return_inverse=True)
    joint = np.zeros((z.max() + 1, y.max() + 1))
    np.add.at(joint, (z, y), 1.0)
    joint /= joint.sum()
    p_z = joint.sum(axis=1, keepdims=True)
    present = joint > 0
    return float(np.sum(joint[present] * np.log((joint / p_z)[present])))


def leep(source_logits: np.ndarray, labels: np.ndarray) -> float:
    """LEEP: mean log Σ_z P(y_i | z) θ_z(x_i), θ the network's own class probabilities (≤ 0)."""
    theta = softmax(np.asarray(source_logits, dtype=np.float64), axis=1)
    _, y = np.unique(labels, return_inverse=True)
    one_hot = np.eye(y.max() + 1)[y]
    joint = theta.T @ one_hot / len(y)  # P(z, y)
    conditional = joint / joint.sum(axis=1, keepdims=True)  # P(y | z)
    log_eep = np.log(conditional.T[y] + 1e-300) + np.log(theta + 1e-300)
    return float(np.mean(logsumexp(log_eep, axis=1)))


def knn_accuracy(features: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Mean stratified k-fold accuracy of a 5-nearest-neighbour classifier (cosine)."""
    f = np.asarray(features, dtype=np.float64)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    folds = min(folds, int(np.bincount(np.unique(labels, return_inverse=True)[1]).min()))
    splitter = StratifiedKFold(n_splits=max(folds, 2), shuffle=True, random_state=seed)
    correct = 0
    for fit, held in splitter.split(f, labels):
        model = KNeighborsClassifier(n_neighbors=min(5, len(fit))).fit(f[fit], labels[fit])
        correct += int(np.sum(model.predict(f[held]) == labels[held]))
    return correct / len(labels)


SCORES = ("logme", "h_score", "nce", "leep", "knn")
