"""Nodes of the label_next pipeline."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from transfer_learning.core.tasks import Tasks, require_single_task
from transfer_learning.data.duplicates import same_picture_check
from transfer_learning.data.images import thumbnail
from transfer_learning.data.settings import DataSettings
from transfer_learning.features.acquisition import (
    TABLE_COLUMNS,
    LabelNextSettings,
    labelling_manifest,
    propose_labels,
)
from transfer_learning.kedro_io.tracking import MlflowMetrics, mlflow_metrics
from transfer_learning.models.heads import HeadSettings
from transfer_learning.reporting.data_quality import image_montage

logger = logging.getLogger(__name__)


def propose_next_labels(  # noqa: PLR0913 (what is labelled, the pool, and the settings)
    image_features: dict[str, np.ndarray],
    unlabelled_features: dict[str, np.ndarray],
    unlabelled_index: pd.DataFrame,
    class_names: dict[str, Any],
    label_next: dict[str, Any],
    head: dict[str, Any],
    data: dict[str, Any],
    seed: int,
) -> tuple[pd.DataFrame, pd.DataFrame, Figure, MlflowMetrics, dict[str, str]]:
    """The `label_next.count` pool images to label next (label_next.csv), a manifest to fill
    in and feed back, a montage of the batch, the run's figures for MLflow and what `auto`
    resolved to (MLflow parameters). Only train
    and val labels are read: test images are never labelled, trained on or ranked."""
    require_single_task(class_names, "label_next")
    started = time.perf_counter()
    classes = Tasks.from_class_names(class_names).primary
    labelled = np.isin(image_features["split"], ["train", "val"]) & (image_features["label"] >= 0)
    check = same_picture_check(
        unlabelled_index["location"].tolist(), DataSettings.from_params(data).cache_dir
    )
    proposal = propose_labels(
        unlabelled_index,
        unlabelled_features["features"],
        (image_features["features"][labelled], image_features["label"][labelled]),
        classes,
        LabelNextSettings.from_params(label_next),
        HeadSettings.from_params(head),
        seed,
        check,
    )
    index = pd.DataFrame(
        {
            "location": image_features["location"],
            "class_name": np.asarray(classes, dtype=object)[image_features["label"]],
            "split": image_features["split"],
        }
    )
    manifest = labelling_manifest(index, unlabelled_index, proposal)
    seconds = time.perf_counter() - started
    logger.info(
        "label_next: %d of %d unlabelled images ranked by %s in %.1f s (%d near-duplicates passed "
        "over). Label them in data/08_reporting/label_next_manifest.csv, then run "
        '--params="data.source=manifest,data.manifest=<that file>,data.split_column=split".',
        len(proposal.table),
        len(unlabelled_index),
        proposal.method,
        seconds,
        proposal.passed_over,
    )
    montage = image_montage(
        [
            (row.location, f"#{row.rank}: {row.suggested_label}? ({row.confidence:.0%})")
            for row in proposal.table.itertuples()
        ],
        thumbnail,
        f"Label next ({proposal.method}): the suggested label is the current model's guess",
        "Nothing to label",
    )
    metrics = {
        "n_unlabelled": len(unlabelled_index),
        "n_proposed": len(proposal.table),
        "n_labelled": int(labelled.sum()),
        "near_duplicates_passed_over": proposal.passed_over,
        "seconds": seconds,
    }
    choice = {"method": proposal.method, "head_type": proposal.head_type}
    return proposal.table[TABLE_COLUMNS], manifest, montage, mlflow_metrics(metrics), choice
