"""Classical scikit-learn heads on frozen features, with hyper-parameters chosen on val only."""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss
from sklearn.model_selection import ParameterGrid, StratifiedKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from transfer_learning.core.config import check_known_keys

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


class PrototypeClassifier(ClassifierMixin, BaseEstimator):
    """Nearest class mean on L2-normalised features (a prototype head for few shots).

    Each class is the mean of its unit-length training features; an image's scores are its
    cosine similarities to the class means, softmaxed at `temperature`. With one to a few images
    a class it has nothing to over-fit (SimpleShot, Wang et al. 2019); `temperature` changes only
    the confidence, so selection by accuracy, then log-loss, sets it for calibration.
    """

    def __init__(self, temperature: float = 10.0) -> None:
        self.temperature = temperature

    def fit(self, features: np.ndarray, labels: np.ndarray) -> PrototypeClassifier:
        self.classes_, which = np.unique(labels, return_inverse=True)
        unit = unit_rows(features)
        means = np.stack([unit[which == k].mean(axis=0) for k in range(len(self.classes_))])
        self.prototypes_ = unit_rows(means)
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        scores = self.temperature * unit_rows(features) @ self.prototypes_.T
        scores -= scores.max(axis=1, keepdims=True)
        exp = np.exp(scores)
        return exp / exp.sum(axis=1, keepdims=True)

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(features).argmax(axis=1)]


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float64)
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


def _prototype(seed: int, class_weight: str | None, **params: Any) -> ClassifierMixin:
    return PrototypeClassifier(**params)  # every class counts once whatever its size


class PriorAdjusted(ClassifierMixin, BaseEstimator):
    """A classifier whose log-probabilities lose τ·log(training class prior) (post-hoc logit
    adjustment, Menon et al. 2021): the argmax moves towards the balanced-error choice, so rare
    classes are no longer predicted less often just because they were rare in training."""

    def __init__(self, classifier: ClassifierMixin, tau: float = 1.0) -> None:
        self.classifier = classifier
        self.tau = tau

    def fit(self, features: np.ndarray, labels: np.ndarray) -> PriorAdjusted:
        self.classifier.fit(features, labels)
        self.classes_ = self.classifier.classes_
        counts = np.array([(labels == label).sum() for label in self.classes_], dtype=np.float64)
        self.log_prior_ = np.log(counts / counts.sum())
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        log_p = np.log(np.maximum(self.classifier.predict_proba(features), 1e-300))
        adjusted = log_p - self.tau * self.log_prior_
        adjusted -= adjusted.max(axis=1, keepdims=True)
        exp = np.exp(adjusted)
        return exp / exp.sum(axis=1, keepdims=True)

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(features).argmax(axis=1)]


class TaskHeads(BaseEstimator):
    """One fitted head per task on the same features (several label columns): `heads` maps
    task → head, in task order. `predict` gives every task's label id (one column per task);
    `predict_task_proba` every task's class probabilities."""

    def __init__(self, heads: dict[str, Any]) -> None:
        self.heads = heads

    def predict_task_proba(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """task → (rows, classes the head saw) probabilities; columns follow `head.classes_`."""
        return {task: head.predict_proba(features) for task, head in self.heads.items()}

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.stack([head.predict(features) for head in self.heads.values()], axis=1)


# The project's own estimator types: with scikit-learn's, the only types a stored head may hold
# (skops refuses every other type on load; the catalog's MLflow copy lists the same ones).
TRUSTED_HEAD_TYPES = (
    "transfer_learning.models.heads.PrototypeClassifier",
    "transfer_learning.models.heads.PriorAdjusted",
    "transfer_learning.models.heads.TaskHeads",
)

_HEADS = {
    "logistic_regression": (_logistic_regression, {"C": [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]}),
    "linear_svm": (_linear_svm, {"estimator__C": [1e-4, 1e-3, 1e-2, 1e-1, 1.0]}),
    "knn": (_knn, {"n_neighbors": [1, 5, 10, 20, 50], "weights": ["distance"]}),
    "prototype": (_prototype, {"temperature": [5.0, 10.0, 20.0, 50.0]}),
}
# type: auto chooses among these by the same val / cross-validation selection as the grid. With
# fewer than 2 images in some class (nothing to select on) it takes the first, the prototype head.
AUTO_CANDIDATES = ("prototype", "logistic_regression")


@dataclass(frozen=True)
class HeadSettings:
    """The `head` block of parameters_head.yml."""

    type: str = "auto"  # auto: the better on val (or CV) of AUTO_CANDIDATES
    params: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] | None = None  # None: the head type's default grid
    class_weight: str | None = None
    logit_adjustment: float | None = None  # τ of post-hoc logit adjustment (long-tailed train)
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
        tau = settings.logit_adjustment
        if tau is not None and (
            not isinstance(tau, int | float) or isinstance(tau, bool) or tau < 0
        ):
            raise HeadError(
                f"head.logit_adjustment={tau!r} must be null or a number ≥ 0 (τ; 1 is usual)."
            )
        if not isinstance(settings.cv_folds, int) or settings.cv_folds < 2:
            raise HeadError(f"head.cv_folds={settings.cv_folds!r} must be an integer ≥ 2.")
        return settings

    def candidate_types(self) -> tuple[str, ...]:
        return AUTO_CANDIDATES if self.type == "auto" else (self.type,)

    def default_grid(self, head_type: str | None = None) -> dict[str, list[Any]]:
        """`grid` and `params` are the configured type's; under auto, logistic regression's."""
        head_type = head_type or self.type
        if self.grid is not None and head_type == self._configured_type():
            return {key: list(values) for key, values in self.grid.items()}
        return dict(_HEADS[head_type][1]) if head_type in _HEADS else {}

    def _configured_type(self) -> str:
        return AUTO_CANDIDATES[-1] if self.type == "auto" else self.type


def build_head(settings: HeadSettings, seed: int, head_type: str | None = None) -> Pipeline:
    """Standardisation + the classifier `head_type` (default: the configured, non-auto type) as
    one sklearn Pipeline (the scaler fits on train)."""
    head_type = head_type or settings.type
    if head_type == "auto":
        raise HeadError("head.type=auto is resolved by select_and_fit; build a concrete type.")
    params = settings.params if head_type == settings._configured_type() else {}
    if head_type in _HEADS:
        estimator = _HEADS[head_type][0](seed, settings.class_weight, **params)
    else:
        estimator = _import_estimator(settings)
    if settings.logit_adjustment:
        estimator = PriorAdjusted(estimator, settings.logit_adjustment)
    # The prototype head only centres: per-dimension spreads from a few images are noise.
    scaler = StandardScaler(with_std=head_type != "prototype")
    return Pipeline([("scale", scaler), ("classifier", estimator)])


def _import_estimator(settings: HeadSettings) -> ClassifierMixin:
    module_name, _, class_name = settings.type.rpartition(".")
    try:
        estimator_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise HeadError(
            f"head.type={settings.type!r} is neither one of {', '.join(_HEADS)} nor an importable "
            "scikit-learn classifier path such as sklearn.tree.DecisionTreeClassifier."
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
    head_type: str = ""  # the type fitted (what `auto` chose)
    held_out: HeldOut | None = None  # what the chosen head predicts on images it did not fit


@dataclass(frozen=True)
class HeldOut:
    """Predictions of the chosen head on images it was not fitted on (what calibration and a
    combination's weights are fitted on): `rows` of train+val (train first), `probabilities`
    with a column per label of `classes`, and how they were held out."""

    rows: np.ndarray
    probabilities: np.ndarray
    classes: np.ndarray
    how: str


def _grid_points(
    template: Pipeline, settings: HeadSettings, head_type: str
) -> list[dict[str, Any]]:
    prefix = _parameter_prefix(template)
    grid = [
        {f"{prefix}{k}": v for k, v in point.items()}
        for point in ParameterGrid(settings.default_grid(head_type))
    ]
    if _warm_startable(template):
        # Walk the grid in order (e.g. C from small to large), each fit starting from the last.
        grid.sort(
            key=lambda point: [v if isinstance(v, int | float) else str(v) for v in point.values()]
        )
    return grid or [{}]


def _parameter_prefix(template: Pipeline) -> str:
    """How the grid's keys reach the classifier (through the logit-adjustment wrapper or not)."""
    wrapped = isinstance(template["classifier"], PriorAdjusted)
    return "classifier__classifier__" if wrapped else "classifier__"


def _warm_startable(template: Pipeline) -> bool:
    # Logistic regression walks the grid warm-started from the previous point, as
    # LogisticRegressionCV does along its C path: several times faster on large feature sets.
    # (Ensembles also take `warm_start`, but there it means "add trees": a refit with as many
    # trees would silently fit nothing.)
    classifier = template["classifier"]
    return isinstance(getattr(classifier, "classifier", classifier), LogisticRegression)


def _scores_on(
    template: Pipeline, grid: list[dict[str, Any]], train, held_out
) -> list[tuple[float, float]]:
    """(accuracy, log-loss) on `held_out` of a fit on `train`, for every grid point."""
    warm = _warm_startable(template)
    warm_start = {f"{_parameter_prefix(template)}warm_start": True} if warm else {}
    candidate = clone(template).set_params(**warm_start)
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
    return len(val_labels) == 0 or smallest_class(val_labels) < CV_BELOW_VAL_PER_CLASS


def smallest_class(labels: np.ndarray) -> int:
    """How many images the least represented class among `labels` has."""
    return int(np.unique(labels, return_counts=True)[1].min())


def _fold_scores(template, grid, train, val, settings: HeadSettings, seed: int) -> np.ndarray:
    """(folds, grid points, [accuracy, log-loss]) of stratified k-fold CV on train+val."""
    features, labels = np.concatenate([train[0], val[0]]), np.concatenate([train[1], val[1]])
    folds = min(settings.cv_folds, smallest_class(labels))  # ≥ 2: select_and_fit checks
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return np.array(
        [
            _scores_on(template, grid, (features[fit], labels[fit]), (features[held], labels[held]))
            for fit, held in splitter.split(features, labels)
        ]
    )


@dataclass(frozen=True)
class _Candidate:
    """One head type with one grid point."""

    head_type: str
    template: Pipeline
    point: dict[str, Any]

    def params(self) -> dict[str, Any]:
        prefix = _parameter_prefix(self.template)
        return {k.removeprefix(prefix): v for k, v in self.point.items()}


def select_and_fit(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    settings: HeadSettings,
    seed: int,
) -> FittedHead:
    """Choose the head (type under `auto`, and hyper-parameters), then refit on train+val (or
    keep a fit on train alone).

    The choice is the best accuracy on val — or, when val is small (`selection: auto`), the best
    mean accuracy over stratified k-fold cross-validation on train+val; ties go to the lower
    log-loss, never to grid order. Only train and val reach this function: the test split
    cannot influence the choice.
    """
    start = time.perf_counter()
    types = settings.candidate_types()
    labels = np.concatenate([train[1], val[1]])
    cv = _uses_cv(val[1], settings)
    # One image in some class and no val split: nothing to select on. The first candidate (under
    # auto the prototype head) is fitted with its defaults.
    selectable = not cv or smallest_class(labels) >= 2
    if not selectable:
        types = types[:1]
        logger.warning("head: one image in some class and no val split; nothing is selected")
    candidates, rows = [], []
    for head_type in types:
        template = build_head(settings, seed, head_type)
        grid = _grid_points(template, settings, head_type) if selectable else [{}]
        if not selectable:
            scores = np.full((1, 1, 2), np.nan)
        elif cv:
            scores = _fold_scores(template, grid, train, val, settings, seed)
        else:
            scores = np.array([_scores_on(template, grid, train, val)])
        mean, spread = scores.mean(axis=0), scores.std(axis=0)
        for i, point in enumerate(grid):
            candidates.append(_Candidate(head_type, template, point))
            rows.append((mean[i, 0], spread[i, 0], mean[i, 1]))
    search = [
        {
            **({"type": candidate.head_type} if len(types) > 1 else {}),
            **candidate.params(),
            "val_accuracy": float(accuracy),
            "val_accuracy_std": float(spread),
            "val_log_loss": float(loss),
        }
        for candidate, (accuracy, spread, loss) in zip(candidates, rows, strict=True)
    ]
    best = max(range(len(candidates)), key=lambda i: (rows[i][0], -rows[i][2]))
    for row in search:
        logger.info("head %s (%s): %s", settings.type, "cv" if cv else "val", row)
    chosen = candidates[best]
    model = clone(chosen.template).set_params(**chosen.point)
    held_out = _fit_final(model, train, val, settings, seed)
    return FittedHead(
        model=model,
        best_params=chosen.params(),
        val_accuracy=float(rows[best][0]),
        fit_seconds=time.perf_counter() - start,
        search=search,
        selection="cv" if cv else "val",
        chosen=search[best],
        head_type=chosen.head_type,
        held_out=held_out,
    )


def _fit_final(model: Pipeline, train, val, settings: HeadSettings, seed: int) -> HeldOut | None:
    """Fit the chosen head on train+val (or train alone); returns its held-out predictions."""
    if settings.refit_on_train_val:
        held_out = _out_of_fold(model, train, val, settings, seed)
        model.fit(np.concatenate([train[0], val[0]]), np.concatenate([train[1], val[1]]))
        return held_out
    model.fit(*train)
    return HeldOut(
        len(train[1]) + np.arange(len(val[1])),
        model.predict_proba(val[0]) if len(val[1]) else np.empty((0, len(model.classes_))),
        np.asarray(model.classes_),
        "val",
    )


def _out_of_fold(model: Pipeline, train, val, settings: HeadSettings, seed: int) -> HeldOut | None:
    """Out-of-fold probabilities of the chosen head on train+val, the images the final head is
    refitted on: each image is predicted by a fit on the other folds (none when some class has
    a single image)."""
    features, labels = np.concatenate([train[0], val[0]]), np.concatenate([train[1], val[1]])
    folds = min(settings.cv_folds, smallest_class(labels))
    if folds < 2:
        return None
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    probabilities = cross_val_predict(
        clone(model), features, labels, cv=splitter, method="predict_proba"
    )
    how = f"out-of-fold on train+val ({folds} folds)"
    return HeldOut(np.arange(len(labels)), probabilities, np.unique(labels), how)
