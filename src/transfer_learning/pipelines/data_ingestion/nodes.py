"""Nodes of the data_ingestion pipeline."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from transfer_learning.image_index import DataSettings, build_image_index, profile_images
from transfer_learning.tracking import MlflowMetrics, mlflow_metrics

logger = logging.getLogger(__name__)


def index_images(
    data: dict[str, Any], seed: int
) -> tuple[pd.DataFrame, dict[str, list[str]], pd.DataFrame, dict[str, Any], MlflowMetrics]:
    """Index the images of `data.source` and split them into train/val/test.

    Returns the image index, the class names by label id, the files left out as unreadable,
    the data profile that `auto` settings follow, and the split sizes (logged to MLflow).
    """
    settings = DataSettings.from_params(data)
    index, classes, skipped = build_image_index(settings, seed)
    profile = profile_images(index, settings, seed)
    logger.info("Data profile (what auto settings follow): %s", profile)
    sizes = index["split"].value_counts()
    logger.info(
        "Indexed %d images in %d classes: %s",
        len(index),
        len(classes),
        ", ".join(f"{split} {sizes.get(split, 0)}" for split in ("train", "val", "test")),
    )
    counts = {f"n_{split}": float(sizes.get(split, 0)) for split in ("train", "val", "test")}
    counts["n_classes"] = float(len(classes))
    counts["n_skipped"] = float(len(skipped))
    counts["typical_short_side"] = float(profile["typical_short_side"])
    return index, {"classes": classes}, skipped, profile, mlflow_metrics(counts)
