"""Nodes of the feature_extraction pipeline."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from transfer_learning.backbones import BackboneSettings, build_backbone, resolve_image_size
from transfer_learning.extraction import ExtractionSettings, extract_features, resolve_device
from transfer_learning.tracking import MlflowMetrics, mlflow_metrics

logger = logging.getLogger(__name__)


def extract_image_features(
    image_index: pd.DataFrame,
    data_profile: dict[str, Any],
    backbone: dict[str, Any],
    extraction: dict[str, Any],
    device: str,
) -> tuple[dict[str, np.ndarray], MlflowMetrics]:
    """Run every image of the index through the frozen backbone.

    Returns arrays `features` (n, d) float32, `label`, `split` and `location` in index order,
    plus the backbone's name and (resolved) image size, and extraction metrics for MLflow.
    """
    backbone_settings = resolve_image_size(
        BackboneSettings.from_params(backbone), data_profile["typical_short_side"]
    )
    model = build_backbone(backbone_settings)
    result = extract_features(
        model,
        image_index["location"].tolist(),
        ExtractionSettings.from_params(extraction),
        resolve_device(device),
    )
    n_images = len(image_index)
    rate = n_images / result.seconds if result.seconds else 0.0
    logger.info(
        "Features %s for %d images with %s@%dpx%s",
        result.features.shape,
        n_images,
        model.name,
        model.preprocessing.image_size,
        " (cached)" if result.cached else f" in {result.seconds:.1f} s ({rate:.0f} img/s)",
    )
    arrays = {
        "features": np.asarray(result.features, dtype=np.float32),
        "label": image_index["label"].to_numpy(np.int64),
        "split": image_index["split"].to_numpy(str),
        "location": image_index["location"].to_numpy(str),
        "backbone": np.array(model.name),
        "image_size": np.array(model.preprocessing.image_size),
    }
    metrics = {
        "n_images": n_images,
        "feature_dim": model.feature_dim,
        "seconds": result.seconds,
        "images_per_second": rate,
        "cached": float(result.cached),
        "image_size": model.preprocessing.image_size,
    }
    return arrays, mlflow_metrics(metrics)
