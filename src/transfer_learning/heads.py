"""Classical scikit-learn heads on frozen features, with hyper-parameters chosen on val only."""

from __future__ import annotations

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
from sklearn.metrics import accuracy_score, log_loss
from sklearn.model_selection import ParameterGrid, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from transfer_learning.config import check_known_keys

logger = logging.getLogger(__name__)


class HeadError(ValueError):
    """A head cannot be built as configured."""


SELECTIONS = ("auto", "val", "cv")
# selection: auto chooses by cross-validation on train+val when val has fewer images than this
# in some class: a val split of a few dozen images ties most grid points on accuracy.
CV_BELOW_VAL_PER_CLASS = 50


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
    selection: str = "auto"  # auto | val | cv: how hyper-parameters are chosen (see select_and_fit)
    cv_folds: int = 5

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> HeadSettings:
        check_known_keys(cls, params, "head", HeadError)
        settings = cls(**{k: (dict(v) if isinstance(v, Mapping) else v) for k, v in params.items()})
        if settings.class_weight not in (None, "balanced"):
            raise HeadError(
                f"head.class_weight={settings.class_weight!r} must be null or 'balanced'."
            )
        if settings.selection not in SELECTIONS:
            raise HeadError(
                f"head.selection={settings.selection!r} must be one of {', '.join(SELECTIONS)}."
            )
        if not isinstance(settings.cv_folds, int) or settings.cv_folds < 2:
            raise HeadError(f"head.cv_folds={settings.cv_folds!r} must be an integer ≥ 2.")
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
    val_accuracy: float  # of the chosen point: on val, or the mean over the CV folds
    fit_seconds: float
    search: list[dict[str, Any]]  # per grid point: accuracy (mean, std over folds), log-loss
    selection: str  # "val" or "cv"
    chosen: dict[str, Any]  # the search row of the chosen point


def _grid_points(template: Pipeline, settings: HeadSettings) -> list[dict[str, Any]]:
    grid = [
        {f"classifier__{k}": v for k, v in point.items()}
        for point in ParameterGrid(settings.default_grid())
    ]
    if _warm_startable(template):
        # Walk the grid in order (e.g. C from small to large), each fit starting from the last.
        grid.sort(
            key=lambda point: [v if isinstance(v, int | float) else str(v) for v in point.values()]
        )
    return grid or [{}]


def _warm_startable(template: Pipeline) -> bool:
    # Logistic regression walks the grid warm-started from the previous point, as
    # LogisticRegressionCV does along its C path: several times faster on large feature sets.
    # (Ensembles also take `warm_start`, but there it means "add trees": a refit with as many
    # trees would silently fit nothing.)
    return isinstance(template["classifier"], LogisticRegression)


def _scores_on(
    template: Pipeline, grid: list[dict[str, Any]], train, held_out
) -> list[tuple[float, float]]:
    """(accuracy, log-loss) on `held_out` of a fit on `train`, for every grid point."""
    warm = _warm_startable(template)
    candidate = clone(template).set_params(**({"classifier__warm_start": True} if warm else {}))
    scores = []
    for point in grid:
        candidate = (candidate if warm else clone(template)).set_params(**point)
        candidate.fit(*train)
        probabilities = candidate.predict_proba(held_out[0])
        predicted = candidate.classes_[probabilities.argmax(axis=1)]
        scores.append(
            (
                float(accuracy_score(held_out[1], predicted)),
                float(log_loss(held_out[1], probabilities, labels=candidate.classes_)),
            )
        )
    return scores


def _uses_cv(val_labels: np.ndarray, settings: HeadSettings) -> bool:
    if settings.selection != "auto":
        return settings.selection == "cv"
    return len(val_labels) == 0 or _smallest_class(val_labels) < CV_BELOW_VAL_PER_CLASS


def _smallest_class(labels: np.ndarray) -> int:
    """How many images the least represented class among `labels` has."""
    return int(np.unique(labels, return_counts=True)[1].min())


def _fold_scores(template, grid, train, val, settings: HeadSettings, seed: int) -> np.ndarray:
    """(folds, grid points, [accuracy, log-loss]) of stratified k-fold CV on train+val."""
    features, labels = np.concatenate([train[0], val[0]]), np.concatenate([train[1], val[1]])
    folds = min(settings.cv_folds, _smallest_class(labels))
    if folds < 2:
        raise HeadError("head.selection=cv needs at least 2 images of every class in train+val.")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return np.array(
        [
            _scores_on(template, grid, (features[fit], labels[fit]), (features[held], labels[held]))
            for fit, held in splitter.split(features, labels)
        ]
    )


def select_and_fit(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    settings: HeadSettings,
    seed: int,
) -> FittedHead:
    """Choose hyper-parameters, then refit on train+val (or keep a fit on train alone).

    The choice is the best accuracy on val — or, when val is small (`selection: auto`), the best
    mean accuracy over stratified k-fold cross-validation on train+val; ties go to the lower
    log-loss, never to grid order. Only train and val reach this function: the test split
    cannot influence the choice.
    """
    start = time.perf_counter()
    template = build_head(settings, seed)
    grid = _grid_points(template, settings)
    cv = _uses_cv(val[1], settings)
    scores = (
        _fold_scores(template, grid, train, val, settings, seed)
        if cv
        else np.array([_scores_on(template, grid, train, val)])
    )
    mean, spread = scores.mean(axis=0), scores.std(axis=0)
    search = [
        {
            **{k.removeprefix("classifier__"): v for k, v in point.items()},
            "val_accuracy": float(mean[i, 0]),
            "val_accuracy_std": float(spread[i, 0]),
            "val_log_loss": float(mean[i, 1]),
        }
        for i, point in enumerate(grid)
    ]
    best = max(range(len(grid)), key=lambda i: (mean[i, 0], -mean[i, 1]))
    for row in search:
        logger.info("head %s (%s): %s", settings.type, "cv" if cv else "val", row)
    model = clone(template).set_params(**grid[best])
    if settings.refit_on_train_val:
        model.fit(np.concatenate([train[0], val[0]]), np.concatenate([train[1], val[1]]))
    else:
        model.fit(*train)
    return FittedHead(
        model=model,
        best_params={k.removeprefix("classifier__"): v for k, v in grid[best].items()},
        val_accuracy=float(mean[best, 0]),
        fit_seconds=time.perf_counter() - start,
        search=search,
        selection="cv" if cv else "val",
        chosen=search[best],
    )
