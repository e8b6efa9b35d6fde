"""Classical scikit-learn heads on frozen features, with hyper-parameters chosen on val only."""

from __future__ import annotations

import copy
import importlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.base import ClassifierMixin, clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.model_selection import ParameterGrid
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from transfer_learning.config import check_known_keys

logger = logging.getLogger(__name__)


class HeadError(ValueError):
    """A head cannot be built as configured."""


def _logistic_regression(seed: int, class_weight: str | None, **params: Any) -> ClassifierMixin:
    # Multinomial L-BFGS, as in Kornblith et al. 2019; C is chosen on val.
    return LogisticRegression(
        solver="lbfgs", max_iter=1000, class_weight=class_weight, random_state=seed, **params
    )


def _linear_svm(seed: int, class_weight: str | None, **params: Any) -> ClassifierMixin:
    # Platt scaling on internal folds of train gives the probabilities evaluation needs.
    svm = LinearSVC(class_weight=class_weight, random_state=seed, **params)
    return CalibratedClassifierCV(svm, method="sigmoid", cv=3)


def _knn(seed: int, class_weight: str | None, **params: Any) -> ClassifierMixin:
    return KNeighborsClassifier(**params)


_HEADS = {
    "logistic_regression": (_logistic_regression, {"C": [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]}),
    "linear_svm": (_linear_svm, {"estimator__C": [1e-4, 1e-3, 1e-2, 1e-1, 1.0]}),
    "knn": (_knn, {"n_neighbors": [1, 5, 10, 20, 50], "weights": ["distance"]}),
}


@dataclass(frozen=True)
class HeadSettings:
    """The `head` block of parameters_feature_transfer.yml."""

    type: str = "logistic_regression"
    params: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] | None = None  # None: the head type's default grid
    class_weight: str | None = None
    refit_on_train_val: bool = True

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> HeadSettings:
        check_known_keys(cls, params, "head", HeadError)
        settings = cls(**{k: (dict(v) if isinstance(v, Mapping) else v) for k, v in params.items()})
        if settings.class_weight not in (None, "balanced"):
            raise HeadError(
                f"head.class_weight={settings.class_weight!r} must be null or 'balanced'."
            )
        return settings

    def default_grid(self) -> dict[str, list[Any]]:
        if self.grid is not None:
            return {key: list(values) for key, values in self.grid.items()}
        return dict(_HEADS[self.type][1]) if self.type in _HEADS else {}


def build_head(settings: HeadSettings, seed: int) -> Pipeline:
    """Standardisation + the configured classifier, as one sklearn Pipeline (scaler fits on train)."""
    if settings.type in _HEADS:
        estimator = _HEADS[settings.type][0](seed, settings.class_weight, **settings.params)
    else:
        estimator = _import_estimator(settings)
    return Pipeline([("scale", StandardScaler()), ("classifier", estimator)])


def _import_estimator(settings: HeadSettings) -> ClassifierMixin:
    module_name, _, class_name = settings.type.rpartition(".")
    try:
        estimator_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise HeadError(
            f"head.type={settings.type!r} is neither one of {', '.join(_HEADS)} nor an importable "
            "scikit-learn classifier path such as sklearn.ensemble.RandomForestClassifier."
        ) from error
    params = dict(settings.params)
    if settings.class_weight and "class_weight" in estimator_class().get_params():
        params["class_weight"] = settings.class_weight
    estimator = estimator_class(**params)
    if not hasattr(estimator, "predict_proba"):
        raise HeadError(
            f"head.type={settings.type!r} has no predict_proba; evaluation needs probabilities "
            "(wrap it, e.g. in sklearn.calibration.CalibratedClassifierCV)."
        )
    return estimator


@dataclass
class FittedHead:
    model: Pipeline
    best_params: dict[str, Any]
    val_accuracy: float
    fit_seconds: float
    search: list[dict[str, Any]]


def select_and_fit(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    settings: HeadSettings,
    seed: int,
) -> FittedHead:
    """Choose hyper-parameters by val accuracy, then refit on train+val (or keep the train fit).

    Only train and val reach this function: the test split cannot influence the choice.
    """
    start = time.perf_counter()
    template = build_head(settings, seed)
    grid = [
        {f"classifier__{k}": v for k, v in point.items()}
        for point in ParameterGrid(settings.default_grid())
    ]
    # Logistic regression walks the grid warm-started from the previous point, as
    # LogisticRegressionCV does along its C path: several times faster on large feature sets.
    # (Ensembles also take `warm_start`, but there it means "add trees": a refit with as many
    # trees would silently fit nothing.)
    warm = isinstance(template["classifier"], LogisticRegression)
    if warm:
        template.set_params(classifier__warm_start=True)
        grid.sort(
            key=lambda point: [
                str(v) if not isinstance(v, int | float) else v for v in point.values()
            ]
        )
    search = []
    best: tuple[float, dict[str, Any], Pipeline] | None = None
    candidate = clone(template)
    for point in grid or [{}]:
        candidate = (candidate if warm else clone(template)).set_params(**point)
        candidate.fit(*train)
        accuracy = float(accuracy_score(val[1], candidate.predict(val[0])))
        shown = {k.removeprefix("classifier__"): v for k, v in point.items()}
        search.append({**shown, "val_accuracy": accuracy})
        logger.info("head %s %s: val accuracy %.4f", settings.type, shown, accuracy)
        if best is None or accuracy > best[0]:
            best = (accuracy, point, copy.deepcopy(candidate))
    accuracy, point, model = best
    if settings.refit_on_train_val:
        # Warm-started from the chosen fit where supported; the scaler is refitted too.
        model.fit(np.concatenate([train[0], val[0]]), np.concatenate([train[1], val[1]]))
    return FittedHead(
        model=model,
        best_params={k.removeprefix("classifier__"): v for k, v in point.items()},
        val_accuracy=accuracy,
        fit_seconds=time.perf_counter() - start,
        search=search,
    )
