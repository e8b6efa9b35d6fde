"""Nodes of the feature_extraction pipeline."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd

from transfer_learning.core.distributed import DistributedSettings
from transfer_learning.core.runtime import resolve_device
from transfer_learning.core.tasks import index_label_matrix
from transfer_learning.features.extraction import ExtractionSettings, extract_features
from transfer_learning.features.selection import SelectionSettings, choose_backbone
from transfer_learning.kedro_io.tracking import MlflowMetrics, mlflow_metrics
from transfer_learning.models.backbones import (
    AUTO,
    BackboneSettings,
    build_backbone,
    resolve_image_size,
)
from transfer_learning.models.onnx_network import ONNXRUNTIME

logger = logging.getLogger(__name__)


def resolve_backbone(  # noqa: PLR0913 (the selection's inputs, used only for name: auto)
    backbone: dict[str, Any],
    data_profile: dict[str, Any],
    image_index: pd.DataFrame,
    backbone_ranking: pd.DataFrame | None,
    selection: dict[str, Any],
    extraction: dict[str, Any],
    seed: int,
    device: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The `backbone` block with every `auto` replaced, and what was chosen and why.

    `name: auto` takes the recommendation of the latest backbone_ranking when it was made on
    these train+val images, and otherwise ranks the candidates now (the selection's features are
    cached). `image_size: auto` follows the data (`backbones.auto_image_size`).
    """
    settings = BackboneSettings.from_params(backbone)
    reason = "backbone.name in the parameters"
    if settings.name == AUTO:
        settings, reason = choose_backbone(
            settings,
            image_index,
            data_profile,
            backbone_ranking,
            SelectionSettings.from_params(selection),
            ExtractionSettings.from_params(extraction),
            resolve_device(device),
            seed,
        )
    resolved = resolve_image_size(settings, data_profile["typical_short_side"])
    logger.info("Backbone %s at %s px (%s)", resolved.name, resolved.image_size, reason)
    choice = {"name": resolved.name, "image_size": resolved.image_size, "reason": reason}
    return asdict(resolved), choice


def extract_image_features(
    image_index: pd.DataFrame,
    backbone: dict[str, Any],
    extraction: dict[str, Any],
    device: str,
    distributed: dict[str, Any],
) -> tuple[dict[str, np.ndarray], MlflowMetrics, dict[str, str]]:
    """Run every image of the index through the frozen backbone (`backbone`: resolved by
    `resolve_backbone`, no `auto` left), on `distributed.*` processes.

    Returns arrays `features` (n, d) float32, `label`, `task_labels` (n, tasks: every label
    column's ids, `tasks.MISSING` where absent), `split` and `location` in index order,
    plus the backbone's name and (resolved) image size; extraction metrics for MLflow; and
    what `extraction.engine` resolved to (an MLflow parameter).
    """
    model = build_backbone(BackboneSettings.from_params(backbone))
    result = extract_features(
        model,
        image_index["location"].tolist(),
        ExtractionSettings.from_params(extraction),
        resolve_device(device),
        DistributedSettings.from_params(distributed),
    )
    n_images = len(image_index)
    rate = n_images / result.seconds if result.seconds else 0.0
    logger.info(
        "Features %s for %d images with %s@%dpx by %s%s",
        result.features.shape,
        n_images,
        model.name,
        model.preprocessing.image_size,
        result.engine,
        " (cached)" if result.cached else f" in {result.seconds:.1f} s ({rate:.0f} img/s)",
    )
    arrays = {
        "features": np.asarray(result.features, dtype=np.float32),
        "label": image_index["label"].to_numpy(np.int64),
        "task_labels": index_label_matrix(image_index),
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
        "onnxruntime": float(result.engine == ONNXRUNTIME),
    }
    return arrays, mlflow_metrics(metrics), {"engine": result.engine}
