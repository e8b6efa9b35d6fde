"""Nodes of the ensemble pipeline."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from transfer_learning.core.tasks import MISSING, Tasks
from transfer_learning.models.calibration import apply_temperature
from transfer_learning.models.combination import choose_weights, mixture
from transfer_learning.pipelines.templates.calibration.nodes import calibrated_other_seed
from transfer_learning.serving.classifier import CombinedClassifier
from transfer_learning.serving.packaging import local_image_classifier

logger = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


def combine_models(
    class_names: dict[str, Any], *member_outputs: Any, members: Sequence[str], strategy: str
) -> tuple[CombinedClassifier, Arrays, dict[str, Any]]:
    """The members' calibrated image models, weighted to minimise the log-loss on the images
    every member held out (val: a head's out-of-fold predictions there, a network's val scores).

    `member_outputs` are each member's image model, then each one's held-out predictions, then
    each one's training summary (in `members` order). Returns the combined model (calibrated in
    turn by the calibration template), its held-out predictions (the weighted mixture) and a
    training summary whose cost is the members' cost: it cannot exist without them.
    """
    started = time.perf_counter()
    count = len(members)
    models = [local_image_classifier(model) for model in member_outputs[:count]]
    held_outs, summaries = member_outputs[count : 2 * count], member_outputs[2 * count :]
    tasks = Tasks.from_class_names(class_names)
    locations, task_labels, scored = _shared_held_out(models, held_outs, tasks)
    labelled = [task_labels[:, k] != MISSING for k in range(len(tasks.names))]
    weights, loss = choose_weights(
        [[p[k][rows] for k, rows in enumerate(labelled)] for p in scored],
        [task_labels[rows, k] for k, rows in enumerate(labelled)],
    )
    if not len(locations):
        logger.warning("%s: no image held out by every member; the weights are equal", strategy)
    by_member = dict(zip(members, weights.tolist(), strict=True))
    logger.info(
        "%s: weights %s chosen on %d held-out images (log-loss %.4f)",
        strategy,
        by_member,
        len(locations),
        loss,
    )
    combined = CombinedClassifier(strategy, models, weights.tolist())
    mixed = [mixture([p[k] for p in scored], weights) for k in range(len(tasks.names))]
    summary = {
        "strategy": strategy,
        "members": list(members),
        "weights": by_member,
        "held_out_images": len(locations),
        "held_out_log_loss": loss,
        "fit_seconds": sum(float(s["fit_seconds"]) for s in summaries)
        + time.perf_counter()
        - started,
        "trainable_parameters": sum(int(s.get("trainable_parameters", 0)) for s in summaries),
        "image_size": combined.image_size,
        "resolved": {
            "image_size": combined.image_size,
            **{f"weight.{name}": weight for name, weight in by_member.items()},
        },
    }
    return combined, _arrays(locations, task_labels, mixed, tasks), summary


def combine_other_seeds(
    class_names: dict[str, Any],
    *members_other_seeds: list[dict[str, Any]],
    members: Sequence[str],
    strategy: str,
) -> list[dict[str, Any]]:
    """The combination of each other seed's member models (`evaluation.seeds`; none by
    default), weighted and calibrated as the deployed combination is. The members train with
    the same seeds, so their k-th models share one."""
    others = []
    for trained in zip(*members_other_seeds, strict=True):
        combined, held_out, summary = combine_models(
            class_names,
            *(member["image_model"] for member in trained),
            *(member["held_out_predictions"] for member in trained),
            *({"fit_seconds": member["fit_seconds"]} for member in trained),
            members=members,
            strategy=strategy,
        )
        others.append(
            calibrated_other_seed(
                trained[0]["seed"], combined, held_out, class_names, summary["fit_seconds"]
            )
        )
    return others


def _shared_held_out(
    models: Sequence[Any], held_outs: Sequence[Arrays], tasks: Tasks
) -> tuple[np.ndarray, np.ndarray, list[list[np.ndarray]]]:
    """The images every member held out (in the last member's order), their labels (rows ×
    tasks, MISSING where absent) and each member's calibrated probabilities: `scored[m][k]`."""
    shared = set.intersection(*(set(h["location"].tolist()) for h in held_outs))
    locations = np.array([x for x in held_outs[-1]["location"].tolist() if x in shared], dtype=str)
    scored = []
    for model, held_out in zip(models, held_outs, strict=True):
        rows = _rows_of(held_out["location"], locations)
        scored.append(
            [
                apply_temperature(
                    _task_arrays(held_out, k, tasks)[1][rows], model.temperatures.get(task, 1.0)
                )
                for k, task in enumerate(tasks.names)
            ]
        )
    rows = _rows_of(held_outs[-1]["location"], locations)
    task_labels = np.stack(
        [_task_arrays(held_outs[-1], k, tasks)[0][rows] for k in range(len(tasks.names))], axis=1
    )
    return locations, task_labels, scored


def _rows_of(locations: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    position = {location: row for row, location in enumerate(locations.tolist())}
    return np.array([position[location] for location in wanted.tolist()], dtype=np.int64)


def _task_arrays(arrays: Arrays, k: int, tasks: Tasks) -> tuple[np.ndarray, np.ndarray]:
    """Task k's labels (MISSING where absent) and probabilities on every row of `arrays`."""
    if not tasks.multi:
        return arrays["label"], arrays["probabilities"]
    return arrays["task_labels"][:, k], arrays[f"probabilities_{k}"]


def _arrays(
    locations: np.ndarray, task_labels: np.ndarray, mixed: list[np.ndarray], tasks: Tasks
) -> Arrays:
    """The mixture's held-out predictions in `score_images`'s layout."""
    arrays = {"label": task_labels[:, 0], "probabilities": mixed[0], "location": locations}
    if tasks.multi:
        arrays["task_labels"] = task_labels
        arrays.update({f"probabilities_{k}": p for k, p in enumerate(mixed)})
    return {**arrays, "held_out": np.asarray("val (held out by every member)")}
