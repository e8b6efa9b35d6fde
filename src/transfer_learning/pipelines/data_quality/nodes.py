"""Nodes of the data_quality pipeline."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from transfer_learning.core.tasks import MISSING, Tasks
from transfer_learning.data.duplicates import find_duplicates_within
from transfer_learning.data.images import thumbnail
from transfer_learning.data.label_issues import (
    DROPPED,
    LabelIssues,
    find_label_issues,
    knn_distances,
    outlier_fence,
)
from transfer_learning.data.settings import DataSettings
from transfer_learning.kedro_io.tracking import MlflowMetrics, mlflow_metrics
from transfer_learning.models.heads import HeadSettings, select_and_fit
from transfer_learning.reporting.data_quality import (
    data_quality_markdown,
    label_issue_montage,
    noise_rate_table,
)
from transfer_learning.reporting.evaluation import align_probabilities

logger = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
ISSUE_COLUMNS = [
    "path",
    "split",
    "given_label",
    "suggested_label",
    "label_quality",
    "is_label_issue",
]
NOISE_COLUMNS = ["class_name", "images", "flagged", "noise_rate"]


def find_label_issues_in_features(
    image_features: Arrays, class_names: dict[str, Any], head: dict[str, Any], seed: int
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Label issues of the train+val images (confident learning on the frozen-feature head's
    out-of-fold probabilities, the `head` settings) and of the test images (by that head
    refitted on train+val: the test split is scored, never fitted on), and the estimated noise
    rate per class. With several label columns, per task (a `task` column)."""
    settings = dataclasses.replace(HeadSettings.from_params(head), refit_on_train_val=True)
    tasks = Tasks.from_class_names(class_names)
    task_labels = image_features.get("task_labels", image_features["label"][:, None])
    split = image_features["split"]
    seen_tables, test_tables, noise_tables = [], [], []
    for column, (task, names) in enumerate(tasks.classes.items()):
        labels = task_labels[:, column]
        labelled = labels != MISSING
        # Images data.on_label_issue=drop left out are judged again, as the train images they were.
        train = np.flatnonzero(np.isin(split, ["train", DROPPED]) & labelled)
        val = np.flatnonzero((split == "val") & labelled)
        test = np.flatnonzero((split == "test") & labelled)
        features = image_features["features"]
        fitted = select_and_fit(
            (features[train], labels[train]), (features[val], labels[val]), settings, seed
        )
        if fitted.held_out is None:
            logger.warning(
                "data_quality: some class%s has one train+val image: no out-of-fold "
                "probabilities, so no label issues can be estimated",
                f" of {task}" if tasks.multi else "",
            )
            continue
        seen = np.concatenate([train, val])[fitted.held_out.rows]
        out_of_fold = align_probabilities(
            fitted.held_out.probabilities, fitted.held_out.classes, len(names)
        )
        found = find_label_issues(labels[seen], out_of_fold)
        seen_tables.append(_table(image_features, seen, labels, found, names, task, tasks.multi))
        if len(test):
            scored = align_probabilities(
                fitted.model.predict_proba(features[test]), fitted.model.classes_, len(names)
            )
            on_test = find_label_issues(labels[test], scored)
            test_tables.append(
                _table(image_features, test, labels, on_test, names, task, tasks.multi)
            )
        noise = noise_rate_table(seen_tables[-1], found.noise_rates, names)
        if tasks.multi:
            noise["class_name"] = [f"{task}: {name}" for name in noise["class_name"]]
        noise_tables.append(noise)
        logger.info(
            "data_quality%s: %d of %d train+val labels flagged",
            f" ({task})" if tasks.multi else "",
            int(found.is_label_issue.sum()),
            len(seen),
        )
    return (
        _joined(seen_tables, ISSUE_COLUMNS),
        _joined(test_tables, ISSUE_COLUMNS),
        _joined(noise_tables, NOISE_COLUMNS),
    )


def _table(
    image_features: Arrays,
    rows: np.ndarray,
    labels: np.ndarray,
    found: LabelIssues,
    names: list[str],
    task: str,
    multi: bool,
) -> pd.DataFrame:
    """One row per image of `rows`, the most suspect (lowest label quality) first."""
    names = np.asarray(names, dtype=object)
    table = pd.DataFrame(
        {
            **({"task": task} if multi else {}),
            "path": image_features["location"][rows].astype(str),
            "split": image_features["split"][rows].astype(str),
            "given_label": names[labels[rows]],
            "suggested_label": names[found.suggested_label],
            "label_quality": np.round(found.label_quality, 6),
            "is_label_issue": found.is_label_issue,
        }
    )
    return table.sort_values("label_quality", kind="stable", ignore_index=True)


def _joined(tables: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    """The tables one under the other; with none (nothing could be estimated), an empty one."""
    if not tables:
        return pd.DataFrame({name: pd.Series(dtype=object) for name in columns})
    return pd.concat(tables, ignore_index=True)


def find_outliers(image_features: Arrays, class_names: dict[str, Any]) -> pd.DataFrame:
    """Every image's mean cosine distance to its nearest train+val images in feature space
    (train+val images leave themselves out), and whether it lies beyond the far-out fence of the
    train+val images' own distances; the farthest first."""
    split = image_features["split"]
    seen = split != "test"
    features = image_features["features"]
    scores = np.empty(len(split))
    scores[seen] = knn_distances(features[seen], features[seen], leave_self_out=True)
    if (~seen).any():
        scores[~seen] = knn_distances(features[~seen], features[seen])
    fence = outlier_fence(scores[seen]) if seen.any() else np.inf
    names = np.asarray(Tasks.from_class_names(class_names).primary, dtype=object)
    labels = image_features["label"]
    table = pd.DataFrame(
        {
            "path": image_features["location"].astype(str),
            "split": split.astype(str),
            "given_label": np.where(labels != MISSING, names[np.maximum(labels, 0)], ""),
            "outlier_score": np.round(scores, 6),
            "is_outlier": scores > fence,
        }
    )
    return table.sort_values("outlier_score", ascending=False, kind="stable", ignore_index=True)


def find_train_val_duplicates(image_index: pd.DataFrame, data: dict[str, Any]) -> pd.DataFrame:
    """Pairs of train/val images that are the same picture (the leakage check's test, applied
    within train+val); with two labels, one of them is wrong."""
    return find_duplicates_within(image_index, DataSettings.from_params(data).cache_dir)


def report_data_quality(
    label_issues: pd.DataFrame,
    test_label_issues: pd.DataFrame,
    noise_rates: pd.DataFrame,
    outliers: pd.DataFrame,
    duplicates: pd.DataFrame,
) -> tuple[str, Figure, MlflowMetrics]:
    """data_quality.md, the montage of the most suspect train+val labels, and MLflow metrics
    `data_quality.*`."""
    flagged = label_issues[label_issues["is_label_issue"].astype(bool)]
    markdown = data_quality_markdown(
        label_issues, test_label_issues, outliers, duplicates, noise_rates
    )
    metrics = {
        "label_issues": len(flagged),
        "label_issue_rate": len(flagged) / max(len(label_issues), 1),
        "test_label_issues": int(test_label_issues["is_label_issue"].astype(bool).sum()),
        "outliers": int(outliers["is_outlier"].astype(bool).sum()),
        "train_val_duplicates": len(duplicates),
        "train_val_label_conflicts": int((~duplicates["same_class"].astype(bool)).sum()),
    }
    return markdown, label_issue_montage(flagged, thumbnail), mlflow_metrics(metrics)
