"""Scoring the test split with the deployable model itself: the code `predict` and the server run."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pandas as pd

from transfer_learning.core.tasks import Tasks
from transfer_learning.serving.classifier import probability_matrix
from transfer_learning.serving.packaging import local_image_classifier

logger = logging.getLogger(__name__)


class EvaluationError(RuntimeError):
    """A split's images cannot be scored."""


def select_test_split(image_index: pd.DataFrame) -> pd.DataFrame:
    """The test rows of the image index: read by evaluation alone."""
    return image_index[image_index["split"] == "test"].reset_index(drop=True)


def score_test_split(image_model: Any, test_index: pd.DataFrame) -> dict[str, np.ndarray]:
    """Class probabilities of the test images from the deployable model itself (see
    `score_images`)."""
    return score_images(image_model, test_index, "test")


def score_val_split(image_model: Any, val_index: pd.DataFrame) -> dict[str, np.ndarray]:
    """Class probabilities of the val images (a network's held-out predictions, which its
    calibration is fitted on), from the model before calibration."""
    return {**score_images(image_model, val_index, "val"), "held_out": np.asarray("val")}


def score_images(image_model: Any, index: pd.DataFrame, split: str) -> dict[str, np.ndarray]:
    """Class probabilities of the images of `index` (one split) from the deployable model itself.

    `image_model` is the packaged `ImageClassifier` (or the MLflow pyfunc that wraps it): the same
    code that `predict` and `mlflow models serve` run, so the metrics describe what is deployed.
    Arrays: `label` and `probabilities` of the (first) task; with several tasks also
    `task_labels` (one column per task, `tasks.MISSING` where absent) and `probabilities_<k>`
    of task k; `predict_seconds`, the wall time of scoring them (the strategy's inference cost);
    `temperatures`, the model's calibration (one T per task), which evaluation undoes to report
    the ECE before calibration.
    """
    classifier = local_image_classifier(image_model)
    locations = index["location"].tolist()
    started = time.perf_counter()
    predictions = classifier.predict_files(locations)
    seconds = time.perf_counter() - started
    failed = predictions[predictions["error"] != ""]
    if not failed.empty:
        listing = "\n".join(
            f"  {locations[i]}: {message}"
            for i, message in failed["error_message"].head(20).items()
        )
        raise EvaluationError(
            f"{len(failed)} {split} image(s) could not be scored:\n{listing}\n"
            "Fix or remove them and re-run data_ingestion (data.on_corrupt=skip leaves "
            "unreadable files out)."
        )
    tasks = Tasks(classifier.tasks)
    labels = tasks.label_matrix(index)
    probabilities = [
        probability_matrix(predictions, tasks.probability_columns(task)) for task in tasks.names
    ]
    arrays = {
        "label": labels[:, 0],
        "probabilities": probabilities[0],
        "location": np.asarray(locations, dtype=str),
        "predict_seconds": np.asarray(seconds, dtype=np.float64),
        "temperatures": np.array([classifier.temperatures.get(t, 1.0) for t in tasks.names]),
    }
    if tasks.multi:
        arrays["task_labels"] = labels
        arrays.update({f"probabilities_{k}": p for k, p in enumerate(probabilities)})
    return arrays
