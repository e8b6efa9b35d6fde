"""How different are the domains? A domain classifier's held-out accuracy and the proxy A-distance."""

from __future__ import annotations

import logging

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from transfer_learning.adaptation.base import AdaptationError

logger = logging.getLogger(__name__)


def domain_shift(
    source_features: np.ndarray, target_features: np.ndarray, max_images: int, seed: int
) -> dict[str, float]:
    """A domain classifier's held-out accuracy on source vs target features, and the proxy
    A-distance 2(1 − 2·error) (Ben-David et al. 2007): 0 = indistinguishable, 2 = disjoint.

    Equal numbers of each domain (at most `max_images`), half to fit, half to score, so 0.5 is
    chance whatever the folder sizes.
    """
    rng = np.random.default_rng(seed)
    per_domain = min(len(source_features), len(target_features), max_images)
    if per_domain < 4:
        raise AdaptationError(
            f"Measuring the domain shift needs at least 4 images of each domain; there are "
            f"{len(source_features)} source and {len(target_features)} target images."
        )
    source = source_features[rng.choice(len(source_features), per_domain, replace=False)]
    target = target_features[rng.choice(len(target_features), per_domain, replace=False)]
    features = np.concatenate([source, target]).astype(np.float64)
    domains = np.repeat([0, 1], per_domain)
    fit_x, held_x, fit_y, held_y = train_test_split(
        features, domains, test_size=0.5, stratify=domains, random_state=seed
    )
    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    accuracy = float(classifier.fit(fit_x, fit_y).score(held_x, held_y))
    error = 1.0 - accuracy
    return {
        "domain_classifier_accuracy": accuracy,
        "proxy_a_distance": float(max(0.0, 2.0 * (1.0 - 2.0 * error))),
        "images_per_domain": int(per_domain),
    }
