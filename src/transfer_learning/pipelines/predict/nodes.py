"""Nodes of the predict pipeline."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from transfer_learning.core.config import require_known_keys
from transfer_learning.data.images import IMAGE_EXTENSIONS
from transfer_learning.serving.packaging import local_image_classifier

logger = logging.getLogger(__name__)


class PredictError(ValueError):
    """The images to label cannot be found."""


def list_images(predict: dict[str, Any], strategies: Sequence[str]) -> pd.DataFrame:
    """Every image file under `predict.path` (any nesting), sorted.

    `predict.strategy` (read by the catalog's `predict_model`) must name a registered strategy.
    """
    require_known_keys(predict, ["path", "strategy"], "predict", PredictError)
    strategy = predict.get("strategy")
    if strategy is not None and strategy not in strategies:
        raise PredictError(
            f"predict.strategy={strategy!r} is not a strategy; use one of {', '.join(strategies)}."
        )
    path = predict.get("path")
    if not path:
        raise PredictError(
            'predict.path is not set; e.g. kedro run --pipelines=predict --params="predict.path=/data/new_images".'
        )
    root = Path(path)
    if not root.is_dir():
        raise PredictError(
            f"predict.path={path!r} is not a folder; point it at a folder of images."
        )
    files = sorted(
        os.path.join(directory, name)
        for directory, _, names in os.walk(root)
        for name in names
        if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and not name.startswith(".")
    )
    if not files:
        raise PredictError(
            f"predict.path={path!r} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})."
        )
    return pd.DataFrame({"path": files})


def predict_images(image_model: Any, images: pd.DataFrame) -> pd.DataFrame:
    """path, predicted class, one probability column per class, and why a file could not be read
    (`error`: a code, `error_message`: in words)."""
    predictions = local_image_classifier(image_model).predict_files(images["path"].tolist())
    table = pd.concat([images.reset_index(drop=True), predictions.reset_index(drop=True)], axis=1)
    unreadable = table[table["error"] != ""]
    if not unreadable.empty:
        logger.warning(
            "%d image(s) could not be read and have no prediction:\n%s",
            len(unreadable),
            "\n".join(f"  {row.path}: {row.error_message}" for row in unreadable.itertuples()),
        )
    logger.info("Labelled %d of %d images", len(table) - len(unreadable), len(table))
    return table
