"""Nodes of the calibration template: temperature scaling fitted on held-out predictions."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from transfer_learning.core.tasks import Tasks, task_predictions
from transfer_learning.models.calibration import (
    apply_temperature,
    fit_temperature,
    mean_log_loss,
)
from transfer_learning.reporting.evaluation import expected_calibration_error
from transfer_learning.serving.classifier import ImageModel
from transfer_learning.serving.packaging import local_image_classifier

logger = logging.getLogger(__name__)


def calibrate_image_model(
    uncalibrated_model: Any, held_out_predictions: dict[str, np.ndarray], class_names: dict
) -> tuple[ImageModel, dict[str, Any]]:
    """The deployable model with one temperature per task, fitted on `held_out_predictions`.

    Those are the uncalibrated model's probabilities on images it did not learn from (a
    network's val split; a head's out-of-fold predictions on train+val; a combination's
    mixture on val), so the test split plays no part. Returns the calibrated model and a summary:
    temperature, and the held-out ECE before and after (per task under `tasks`).
    """
    model = local_image_classifier(uncalibrated_model)
    tasks = Tasks.from_class_names(class_names)
    fitted = {}
    for k, task in enumerate(tasks.names):
        labels, probabilities = task_predictions(held_out_predictions, k)
        temperature = fit_temperature(probabilities, labels)
        calibrated = apply_temperature(probabilities, temperature)
        fitted[task] = {
            "temperature": temperature,
            "held_out_images": int(len(labels)),
            "held_out_log_loss_before": _log_loss(probabilities, labels),
            "held_out_log_loss_after": _log_loss(calibrated, labels),
            "held_out_ece_before": _ece(labels, probabilities),
            "held_out_ece_after": _ece(labels, calibrated),
        }
    first = fitted[tasks.names[0]]
    held_out = str(held_out_predictions.get("held_out", "val"))
    logger.info(
        "%s: temperature %.3f fitted on %d held-out images (%s): ECE %.4f → %.4f",
        model.strategy,
        first["temperature"],
        first["held_out_images"],
        held_out,
        first["held_out_ece_before"],
        first["held_out_ece_after"],
    )
    summary = {"method": "temperature_scaling", "held_out": held_out, **first}
    if tasks.multi:
        summary["tasks"] = fitted
    return model.calibrated({task: f["temperature"] for task, f in fitted.items()}), summary


def calibrated_other_seed(
    seed: int,
    uncalibrated_model: Any,
    held_out_predictions: dict[str, np.ndarray],
    class_names: dict,
    fit_seconds: float,
) -> dict[str, Any]:
    """One entry of `<strategy>.other_seeds` (`evaluation.seeds`): the model trained with `seed`,
    calibrated as the deployed one is, with what it was calibrated on and its training time."""
    calibrated, _ = calibrate_image_model(uncalibrated_model, held_out_predictions, class_names)
    return {
        "seed": seed,
        "image_model": calibrated,
        "held_out_predictions": held_out_predictions,
        "fit_seconds": fit_seconds,
    }


def _log_loss(probabilities: np.ndarray, labels: np.ndarray) -> float | None:
    return mean_log_loss(probabilities, labels) if len(labels) else None


def _ece(labels: np.ndarray, probabilities: np.ndarray) -> float | None:
    return expected_calibration_error(labels, probabilities)[0] if len(labels) else None
