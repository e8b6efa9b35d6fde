"""CORAL (Sun et al. 2016): source features moved to the target's mean, spread and correlations,
the head chosen and refitted on them."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from sklearn.pipeline import Pipeline

from transfer_learning.adaptation.base import AdaptationMethod, FeatureSource, invalid_fields
from transfer_learning.core.strategies import FEATURES
from transfer_learning.models.heads import select_and_fit

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoralTransform:
    """Source features → features with the target's mean, spread and correlations (CORAL).

    Each domain is standardised by its own statistics, the source is whitened with its
    regularised correlation (C_s + λI)^-1/2 and re-coloured with the target's (C_t + λI)^1/2,
    then put back on the target's scale. λ keeps small target samples from collapsing it.
    """

    source_mean: np.ndarray
    source_scale: np.ndarray
    target_mean: np.ndarray
    target_scale: np.ndarray
    mapping: np.ndarray  # (d, d): (C_s + λI)^-1/2 (C_t + λI)^1/2

    @classmethod
    def fit(cls, source: np.ndarray, target: np.ndarray, regularisation: float) -> CoralTransform:
        source_mean, source_scale = _mean_and_scale(source)
        target_mean, target_scale = _mean_and_scale(target)
        source_corr = _covariance((source - source_mean) / source_scale, regularisation)
        target_corr = _covariance((target - target_mean) / target_scale, regularisation)
        mapping = _matrix_power(source_corr, -0.5) @ _matrix_power(target_corr, 0.5)
        return cls(source_mean, source_scale, target_mean, target_scale, mapping)

    def __call__(self, source: np.ndarray) -> np.ndarray:
        standardised = (np.asarray(source, dtype=np.float64) - self.source_mean) / self.source_scale
        return (standardised @ self.mapping) * self.target_scale + self.target_mean


def _mean_and_scale(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    scale = features.std(axis=0)
    return features.mean(axis=0), np.where(scale > 0, scale, 1.0)


def _covariance(standardised: np.ndarray, regularisation: float) -> np.ndarray:
    n = max(1, len(standardised) - 1)
    return standardised.T @ standardised / n + regularisation * np.eye(standardised.shape[1])


def _matrix_power(symmetric: np.ndarray, power: float) -> np.ndarray:
    values, vectors = np.linalg.eigh(symmetric)
    return (vectors * np.clip(values, 1e-12, None) ** power) @ vectors.T


@dataclass(frozen=True)
class CoralSettings:
    regularisation: float = 1.0  # CORAL's λ, added to both standardised covariances

    def invalid(self) -> list[str]:
        return invalid_fields(self, {"regularisation": lambda value: value > 0})


def adapt(source: FeatureSource, settings: CoralSettings, seed: int) -> Pipeline:
    """A head chosen and fitted, as the strategy's, on source features CORAL-aligned to the
    target (hyper-parameters chosen on the aligned source val)."""
    (train, train_labels), (val, val_labels) = source.train, source.val
    align = CoralTransform.fit(train, source.target_features, settings.regularisation)
    fitted = select_and_fit(
        (align(train), train_labels), (align(val), val_labels), source.head_settings, seed
    )
    return fitted.model


METHOD = AdaptationMethod("coral", FEATURES, adapt, CoralSettings)
