"""target_standardisation: a frozen-features head's standardisation refitted on the target features."""

from __future__ import annotations

import logging

import numpy as np
from sklearn.base import clone
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from transfer_learning.adaptation.base import AdaptationError, AdaptationMethod, FeatureSource
from transfer_learning.core.strategies import FEATURES

logger = logging.getLogger(__name__)


def with_target_standardisation(head: Pipeline, target_features: np.ndarray) -> Pipeline:
    """The fitted head with its standardisation (first step) taking the target's per-dimension
    mean and spread: target features reach the classifier as source features did."""
    scaler = head.steps[0][1]
    if not isinstance(scaler, StandardScaler):
        raise AdaptationError(
            f"target_standardisation needs a head that starts with a StandardScaler; this one "
            f"starts with {type(scaler).__name__}."
        )
    adapted = clone(scaler).fit(np.asarray(target_features, dtype=np.float64))
    # Dimensions constant on the target keep the source's spread (sklearn would use 1).
    if scaler.scale_ is not None:  # the prototype head only centres
        constant = np.asarray(target_features).std(axis=0) == 0
        adapted.scale_ = np.where(constant, scaler.scale_, adapted.scale_)
    return Pipeline([(head.steps[0][0], adapted), *head.steps[1:]])


def adapt(source: FeatureSource, settings: None, seed: int) -> Pipeline:
    return with_target_standardisation(source.head, source.target_features)


METHOD = AdaptationMethod("target_standardisation", FEATURES, adapt)
