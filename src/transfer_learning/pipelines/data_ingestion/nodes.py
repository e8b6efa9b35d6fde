"""Nodes of the data_ingestion pipeline."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from transfer_learning.data.duplicates import (
    apply_duplicate_policy,
    find_duplicates,
    leave_out_of_pool,
    pool_duplicates_of_test,
)
from transfer_learning.data.index import build_indexes, profile_images
from transfer_learning.data.label_issues import DROPPED, drop_label_issues
from transfer_learning.data.settings import DataSettings
from transfer_learning.kedro_io.tracking import MlflowMetrics, mlflow_metrics

logger = logging.getLogger(__name__)


def index_images(
    data: dict[str, Any], seed: int, stored_label_issues: pd.DataFrame | None = None
) -> tuple[
    pd.DataFrame,
    dict[str, list[str]],
    pd.DataFrame,
    pd.DataFrame,
    dict[str, Any],
    pd.DataFrame,
    MlflowMetrics,
]:
    """Index the images of `data.source`, split them into train/val/test, check the test
    split for duplicates of train/val images (`data.on_duplicate`) and, with
    `data.on_label_issue=drop`, move the train/val images that the latest data_quality run
    flagged (`stored_label_issues`) to the split `dropped`.

    Returns the image index, the class names by label id (and, with several label columns,
    every task's: `tasks.Tasks`), the files left out as unreadable, the test images found to
    duplicate train/val ones (and the unlabelled images found to duplicate test ones, left out
    of the pool), the data profile that `auto` settings follow, the unlabelled pool, and the
    split sizes (logged to MLflow).
    """
    settings = DataSettings.from_params(data)
    indexed = build_indexes(settings, seed)
    index, tasks, skipped = indexed.index, indexed.tasks, indexed.skipped
    duplicates = find_duplicates(index, settings.cache_dir)
    index = apply_duplicate_policy(index, duplicates, settings.on_duplicate)
    pool_duplicates = pool_duplicates_of_test(index, indexed.pool, settings.cache_dir)
    pool = leave_out_of_pool(indexed.pool, pool_duplicates)
    index = drop_label_issues(index, tasks, stored_label_issues, settings.on_label_issue)
    profile = profile_images(index, settings, seed)
    logger.info("Data profile (what auto settings follow): %s", profile)
    sizes = index["split"].value_counts()
    logger.info(
        "Indexed %d images in %s classes: %s",
        len(index),
        " + ".join(
            f"{size} {task}" if tasks.multi else str(size)
            for task, size in zip(tasks.names, tasks.sizes, strict=True)
        ),
        ", ".join(f"{split} {sizes.get(split, 0)}" for split in ("train", "val", "test")),
    )
    counts = {f"n_{split}": float(sizes.get(split, 0)) for split in ("train", "val", "test")}
    counts["n_classes"] = float(len(tasks.primary))
    if tasks.multi:
        counts["n_tasks"] = float(len(tasks.names))
    counts["n_skipped"] = float(len(skipped))
    counts["n_test_duplicates"] = float(len(duplicates))
    counts["n_unlabelled"] = float(len(pool))
    counts["n_unlabelled_test_duplicates"] = float(len(pool_duplicates))
    if settings.on_label_issue == "drop":
        counts["n_dropped_label_issues"] = float(sizes.get(DROPPED, 0))
    counts["typical_short_side"] = float(profile["typical_short_side"])
    if len(pool_duplicates):
        duplicates = pd.concat([duplicates, pool_duplicates], ignore_index=True)
    return (
        index,
        tasks.to_class_names(),
        skipped,
        duplicates,
        profile,
        pool,
        mlflow_metrics(counts),
    )
