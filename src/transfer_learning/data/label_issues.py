"""Finding the user's own data mistakes: mislabelled images (confident learning) and outliers.

Confident learning (Northcutt, Jiang and Chuang, "Confident Learning: Estimating Uncertainty in
Dataset Labels", JAIR 2021), from out-of-sample predicted probabilities `p` (n × classes) and
the given labels:

1. a threshold per class j: the mean of p_j over the images labelled j (the model's own idea of
   "confident" for that class, so a hard class is not held to an easy class's standard);
2. the confident joint C[i, j]: images labelled i whose p_j reaches class j's threshold (with
   several such j, the most probable), i.e. confidently of class j while labelled i;
3. calibrated to the label counts and normalised, C estimates the joint distribution Q of given
   and true labels; 1 − Q[i, i] / Σ_j Q[i, j] is class i's estimated noise rate;
4. an image is a label issue when two rankings both put it among the likely wrong, and the
   model itself does not predict its given label (the paper's "C+NR"):
   - by noise rate: for every i ≠ j, the n · Q[i, j] images labelled i with the largest margin
     p_j − p_i;
   - by class: for every i, the n · Σ_{j≠i} Q[i, j] images labelled i with the lowest p_i.
   Either alone flags about as many images as it estimates to be wrong, real mistakes of the
   data set included; requiring both trades a little recall for precision (measured on the
   flowers with 5 % of the labels flipped: recall 0.90 instead of 0.92, precision 0.87 instead
   of 0.78, the data set's own suspects left out; docs/benchmarks.md), which is what a person
   reviewing the list wants.

Each image's label quality is p of its given label (self-confidence): lower is more suspect.

Outliers: the mean cosine distance of an image's features to its k nearest train+val images
(itself left out); above Tukey's fence of the train+val images' own distances (Q3 + 1.5 IQR)
means far from every class. On the flowers that flags 56 of 2,934 photos, every one of them,
as far as a person looking at them can tell, a sign, a bus, a cat, a cake rather than a flower
(the far-out fence, Q3 + 3 IQR, flagged none of them).

Acting on them (`data.on_label_issue=drop`): ingestion moves the train/val images that the
latest saved label_issues.csv flags to a split of their own, so no strategy trains on them; the
test split is never changed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from transfer_learning.core.tasks import MISSING, SINGLE_TASK, Tasks

logger = logging.getLogger(__name__)

# data.on_label_issue: what training does with the images the latest data_quality run flagged.
ON_LABEL_ISSUE = ("keep", "drop")
# The split of train/val images left out by data.on_label_issue=drop. They stay in the index, so
# data_quality's next run still judges every image (a dropped image whose label was right comes
# back once it is no longer flagged), while every strategy, which trains on "train" and selects
# on "val", no longer sees them.
DROPPED = "dropped"
OUTLIER_NEIGHBOURS = 10
OUTLIER_FENCE = 1.5  # inter-quartile ranges above the upper quartile (Tukey's fence)
# Rows of query × reference distances per block: bounds the memory whatever the data size.
_BLOCK_ELEMENTS = 8_000_000


@dataclass(frozen=True)
class LabelIssues:
    """Confident learning's findings on a set of images (one task)."""

    is_label_issue: np.ndarray  # (n,) bool
    label_quality: np.ndarray  # (n,) p of the given label: lower is more suspect
    suggested_label: np.ndarray  # (n,) the most probable class
    joint: np.ndarray  # (classes × classes) estimated joint of given (rows) and true labels
    noise_rates: np.ndarray  # (classes,) estimated share of each given class that is wrong


def per_class_thresholds(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Mean predicted probability of class j over the images labelled j (inf for a class with
    no image: nothing is confidently of a class the model never saw labelled)."""
    n_classes = probabilities.shape[1]
    counts = np.bincount(labels, minlength=n_classes)
    sums = np.zeros(n_classes)
    np.add.at(sums, labels, probabilities[np.arange(len(labels)), labels])
    return np.divide(sums, counts, out=np.full(n_classes, np.inf), where=counts > 0)


def confident_joint(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """C[i, j]: images labelled i that are confidently of class j (see the module)."""
    n_classes = probabilities.shape[1]
    # A hair below the threshold still counts: the class's own mean must reach it.
    above = probabilities >= per_class_thresholds(labels, probabilities) - 1e-6
    confident = np.where(above, probabilities, -np.inf).argmax(axis=1)
    counted = above.any(axis=1)
    joint = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(joint, (labels[counted], confident[counted]), 1)
    return joint


def calibrated_joint(joint: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The confident joint with each row scaled to its class's label count, normalised to sum
    to 1: the estimated joint distribution of given and true labels."""
    counts = np.bincount(labels, minlength=len(joint)).astype(np.float64)
    rows = joint.sum(axis=1, keepdims=True)
    scaled = np.divide(joint * counts[:, None], rows, out=np.zeros(joint.shape), where=rows > 0)
    # A class none of whose images reached any threshold keeps its images as labelled.
    empty = rows[:, 0] == 0
    scaled[empty, empty.nonzero()[0]] = counts[empty]
    return scaled / max(scaled.sum(), 1.0)


def find_label_issues(labels: np.ndarray, probabilities: np.ndarray) -> LabelIssues:
    """Confident learning's label issues among images with given `labels` and out-of-sample
    predicted `probabilities` (n × classes), flagged by noise rate and by class (see the
    module)."""
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    n, n_classes = probabilities.shape
    joint = calibrated_joint(confident_joint(labels, probabilities), labels)
    to_flag = _rounded_keeping_row_sums(joint * n)
    given = probabilities[np.arange(n), labels]
    by_noise_rate, by_class = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    for i in range(n_classes):
        labelled = np.flatnonzero(labels == i)
        for j in range(n_classes):
            if i == j or to_flag[i, j] == 0 or not len(labelled):
                continue
            margin = probabilities[labelled, j] - given[labelled]
            by_noise_rate[labelled[np.argsort(-margin, kind="stable")[: to_flag[i, j]]]] = True
        wrong = int(to_flag[i].sum() - to_flag[i, i])
        by_class[labelled[np.argsort(given[labelled], kind="stable")[:wrong]]] = True
    suggested = probabilities.argmax(axis=1)
    # The model itself agreeing with the label is no issue.
    issues = by_noise_rate & by_class & (suggested != labels)
    row_mass = joint.sum(axis=1)
    noise = 1 - np.divide(np.diag(joint), row_mass, out=np.ones(n_classes), where=row_mass > 0)
    return LabelIssues(issues, given, suggested, joint, noise)


def _rounded_keeping_row_sums(counts: np.ndarray) -> np.ndarray:
    """Whole counts whose rows keep their (rounded) sums: the largest remainders round up."""
    floors = np.floor(counts).astype(np.int64)
    short = np.rint(counts.sum(axis=1)).astype(np.int64) - floors.sum(axis=1)
    order = np.argsort(-(counts - floors), axis=1, kind="stable")
    for row, missing in enumerate(short):
        floors[row, order[row, : max(int(missing), 0)]] += 1
    return floors


def _unit(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def knn_distances(
    queries: np.ndarray,
    reference: np.ndarray,
    neighbours: int = OUTLIER_NEIGHBOURS,
    leave_self_out: bool = False,
) -> np.ndarray:
    """Mean cosine distance of each query to its `neighbours` nearest reference rows; with
    `leave_self_out`, queries are the reference itself and each row skips its own."""
    queries, reference = _unit(queries), _unit(reference)
    k = min(neighbours, len(reference) - int(leave_self_out))
    if k < 1:
        return np.zeros(len(queries))
    scores = np.empty(len(queries))
    block = max(1, _BLOCK_ELEMENTS // max(len(reference), 1))
    for start in range(0, len(queries), block):
        distance = 1.0 - queries[start : start + block] @ reference.T
        if leave_self_out:
            rows = np.arange(len(distance))
            distance[rows, rows + start] = np.inf
        nearest = np.partition(distance, k - 1, axis=1)[:, :k]
        scores[start : start + block] = nearest.mean(axis=1)
    return scores


def outlier_fence(reference_scores: np.ndarray) -> float:
    """Tukey's fence of the train+val images' own kNN distances: Q3 + 1.5 IQR."""
    q1, q3 = np.percentile(reference_scores, [25, 75])
    return float(q3 + OUTLIER_FENCE * (q3 - q1))


class LabelIssuePolicyError(ValueError):
    """data.on_label_issue=drop cannot be applied to these images."""


def drop_label_issues(
    index: pd.DataFrame, tasks: Tasks, label_issues: pd.DataFrame | None, on_label_issue: str
) -> pd.DataFrame:
    """`data.on_label_issue`: keep (the index unchanged) or drop: the train/val images that the
    latest data_quality run flagged move to the split `DROPPED`. An image is dropped only while it
    still has the label that was flagged (moved to another class folder, or relabelled in the
    manifest, it trains again); with several label columns, when any of its labels is flagged.
    Test images are never touched."""
    if on_label_issue == "keep":
        return index
    if label_issues is None:
        raise LabelIssuePolicyError(
            "data.on_label_issue=drop leaves out the images that data_quality flagged, but no "
            "data/08_reporting/label_issues.csv has been saved yet: run `kedro run "
            "--pipelines=data_quality` first (or set data.on_label_issue=keep)."
        )
    flagged = label_issues[label_issues["is_label_issue"].astype(bool)].astype(str)
    # As text: read back from CSV, class names such as "7" come as numbers.
    task_of_issue = flagged["task"] if "task" in flagged else pd.Series(SINGLE_TASK, flagged.index)
    suspects = set(zip(flagged["path"], task_of_issue, flagged["given_label"], strict=True))
    labels = tasks.label_matrix(index)
    dropped = np.zeros(len(index), dtype=bool)
    for column, (task, names) in enumerate(tasks.classes.items()):
        given = np.asarray(names, dtype=object)[np.maximum(labels[:, column], 0)]
        dropped |= [
            label != MISSING and (location, task, name) in suspects
            for location, label, name in zip(
                index["location"], labels[:, column], given, strict=True
            )
        ]
    dropped &= index["split"].isin(["train", "val"]).to_numpy()
    _require_training_images(index, dropped, tasks)
    if dropped.any():
        listing = "\n".join(f"  {location}" for location in index.loc[dropped, "location"][:20])
        more = f"\n  … and {dropped.sum() - 20} more" if dropped.sum() > 20 else ""
        logger.warning(
            "data.on_label_issue=drop: %d train/val images flagged as label issues by the latest "
            "data_quality run are left out of training (split %r in the image index; "
            "data.on_label_issue=keep brings them back):\n%s%s",
            dropped.sum(),
            DROPPED,
            listing,
            more,
        )
    index = index.copy()
    index.loc[dropped, "split"] = DROPPED
    return index


def _require_training_images(index: pd.DataFrame, dropped: np.ndarray, tasks: Tasks) -> None:
    train = (index["split"] == "train").to_numpy()
    labels = tasks.label_matrix(index)[:, 0]
    for label, name in enumerate(tasks.primary):
        had = train & (labels == label)
        if had.any() and not (had & ~dropped).any():
            raise LabelIssuePolicyError(
                f"data.on_label_issue=drop would leave class {name!r} without training images: "
                "every one of them is flagged in data/08_reporting/label_issues.csv. Check that "
                "class's labels (the montage data/08_reporting/label_issues.png), or set "
                "data.on_label_issue=keep."
            )
