"""Several label columns at once (multi-task): which tasks a data set has and their labels.

A manifest with more than one `data.label_columns` gives every image one label per column (a
task); a row may lack some of them. The image index then keeps the first task in `label` and
`class_name`, as a single-label index has them, and every task's label ids in a column
`label:<task>`, with MISSING where the row has no label for that task. `class_names` carries
`tasks` (task → class names, in label-id order) besides `classes` (the first task's).

One data set with one label column is the single task `SINGLE_TASK`: every output keeps its
single-label form (`predicted_class`, `probability_<class>`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

MISSING = -1  # the label id of "no label for this task"
TASK_LABEL_PREFIX = "label:"
SINGLE_TASK = "class"  # the one task of a single-label data set (its predicted_class column)
PROBABILITY_PREFIX = "probability_"


def task_label_column(task: str) -> str:
    """The image index's column of `task`'s label ids."""
    return f"{TASK_LABEL_PREFIX}{task}"


@dataclass(frozen=True)
class Tasks:
    """The tasks of a data set or model: task → class names (label-id order), first = primary."""

    classes: Mapping[str, Sequence[str]]

    @classmethod
    def from_class_names(cls, class_names: Mapping[str, Any]) -> Tasks:
        """From the `class_names` dataset: `tasks` when there are several, else `classes`."""
        tasks = class_names.get("tasks") or {SINGLE_TASK: class_names["classes"]}
        return cls({name: list(names) for name, names in tasks.items()})

    @property
    def names(self) -> list[str]:
        return list(self.classes)

    @property
    def sizes(self) -> list[int]:
        return [len(names) for names in self.classes.values()]

    @property
    def primary(self) -> list[str]:
        """The first task's classes: `class_names["classes"]`, the index's `label` column."""
        return list(next(iter(self.classes.values())))

    @property
    def multi(self) -> bool:
        return len(self.classes) > 1

    def to_class_names(self) -> dict[str, Any]:
        """The `class_names` dataset: single-task data keeps its one-key form."""
        if not self.multi:
            return {"classes": self.primary}
        return {"classes": self.primary, "tasks": {k: list(v) for k, v in self.classes.items()}}

    def label_matrix(self, index: pd.DataFrame) -> np.ndarray:
        """(rows, tasks) label ids of image-index rows, MISSING where a row has no label."""
        if not self.multi:
            return index["label"].to_numpy(np.int64)[:, None]
        return np.stack(
            [index[task_label_column(task)].to_numpy(np.int64) for task in self.names], axis=1
        )

    def predicted_column(self, task: str) -> str:
        return "predicted_class" if not self.multi else f"predicted_{task}"

    def probability_columns(self, task: str) -> list[str]:
        """`probability_<class>` (one task) or `probability_<task>_<class>` (several)."""
        prefix = PROBABILITY_PREFIX if not self.multi else f"{PROBABILITY_PREFIX}{task}_"
        return [f"{prefix}{name}" for name in self.classes[task]]


def index_label_matrix(index: pd.DataFrame) -> np.ndarray:
    """(rows, tasks) label ids from the index alone: its `label:<task>` columns, or `label`."""
    columns = [c for c in index.columns if str(c).startswith(TASK_LABEL_PREFIX)]
    if not columns:
        return index["label"].to_numpy(np.int64)[:, None]
    return index[columns].to_numpy(np.int64)


def task_predictions(arrays: Mapping[str, np.ndarray], task: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities of task number `task` from scored arrays (`label` and
    `probabilities`, or `task_labels` and `probabilities_<k>`), on the rows with its label."""
    if "task_labels" not in arrays:
        return arrays["label"], arrays["probabilities"]
    labels = arrays["task_labels"][:, task]
    labelled = labels != MISSING
    return labels[labelled], arrays[f"probabilities_{task}"][labelled]


def require_single_task(class_names: Mapping[str, Any], pipeline: str) -> None:
    """Pipelines that study one labelling refuse multi-task data with what to do instead."""
    tasks = Tasks.from_class_names(class_names)
    if tasks.multi:
        raise ValueError(
            f"The {pipeline} pipeline works on one label column; this data set has "
            f"{len(tasks.names)} (data.label_columns={tasks.names}). Run it with one, e.g. "
            f'--params="data.label_columns={tasks.names[0]}".'
        )


def predicted_by_seed(
    arrays: Mapping[str, np.ndarray], seed_arrays: Mapping[str, np.ndarray], task: int
) -> np.ndarray:
    """(seeds × images) predicted labels of task number `task`, on the rows with its label:
    the scored model's (`arrays`), then those of the same strategy trained with its other seeds
    (`seed_arrays["predicted_<task>"]`, see `evaluation.seeds`; none when absent)."""
    deployed = task_predictions(arrays, task)[1].argmax(axis=1)
    others = seed_arrays.get(f"predicted_{task}", np.empty((0, len(deployed))))
    return np.vstack([deployed, np.asarray(others, dtype=np.int64).reshape(-1, len(deployed))])
