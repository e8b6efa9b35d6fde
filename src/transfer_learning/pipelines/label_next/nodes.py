"""Nodes of the label_next pipeline."""

from __future__ import annotations

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
from transfer_learning.reporting.data_quality import labelling_montage


def propose_next_labels(
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
    resolved to (MLflow parameters). Only train and val labels are read: test images are never
    labelled, trained on or ranked."""
    require_single_task(class_names, "label_next")
    classes = Tasks.from_class_names(class_names).primary
    locations = unlabelled_index["location"].tolist()
    proposal = propose_labels(
        image_features,
        unlabelled_index,
        unlabelled_features["features"],
        classes,
        LabelNextSettings.from_params(label_next),
        HeadSettings.from_params(head),
        seed,
        same_picture_check(locations, DataSettings.from_params(data).cache_dir),
    )
    return (
        proposal.table[TABLE_COLUMNS],
        labelling_manifest(image_features, classes, unlabelled_index, proposal),
        labelling_montage(proposal.table, proposal.method, thumbnail),
        mlflow_metrics(proposal.figures()),
        proposal.choice(),
    )
