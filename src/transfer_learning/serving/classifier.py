"""One deployable model for every strategy: images in, class probabilities out (an MLflow pyfunc).

A model carries everything it needs — architecture name, every weight, preprocessing, the head,
the class names, its calibration — so it predicts in a fresh process without downloads or the
Kedro project. It is also what scores the test split: the metrics describe exactly the model
users deploy.
"""

from __future__ import annotations

import base64
import binascii
import copy
import io
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from transfer_learning.core.runtime import autocast_dtype, resolve_device, usable_cores
from transfer_learning.core.tasks import PROBABILITY_PREFIX, SINGLE_TASK, Tasks
from transfer_learning.data.images import decode_image_bytes, load_rgb_tensor
from transfer_learning.data.loading import EvalCollate, Normaliser, uint8_input
from transfer_learning.models.backbones import BackboneSettings, build_backbone
from transfer_learning.models.calibration import apply_temperature
from transfer_learning.models.onnx_network import (
    AUTO,
    ONNXRUNTIME,
    TORCH,
    packaged_forward,
    resolve_engine,
)
from transfer_learning.reporting.evaluation import align_probabilities

ERROR_COLUMN = "error"
ERROR_MESSAGE_COLUMN = "error_message"

# Per-row error codes: stable, documented (README, "Serve it"), and free of server detail; the
# full exception goes to the server's log.
ERRORS = {
    "missing_input": "The row has no 'image' value: send the image file's bytes, base64-encoded.",
    "bad_base64": "The 'image' value is not valid base64.",
    "not_an_image": "The bytes are not an image this model can read (JPEG, PNG, GIF, WebP, BMP, TIFF).",
    "too_large": "The image is larger than this server accepts (bytes or pixels).",
    "path_not_allowed": "This endpoint does not read server-side paths: send the image bytes as base64 'image'.",
    "unreadable_file": "The file could not be read as an image.",
}
# Deploy-time settings, read from the serving process's environment.
ALLOW_PATHS_VARIABLE = "TRANSFER_LEARNING_ALLOW_PATHS"
ENGINE_VARIABLE = "TRANSFER_LEARNING_ENGINE"  # auto (default) | torch | onnxruntime
MAX_BYTES_VARIABLE = "TRANSFER_LEARNING_MAX_IMAGE_BYTES"
MAX_PIXELS_VARIABLE = "TRANSFER_LEARNING_MAX_IMAGE_PIXELS"
DEFAULT_MAX_BYTES = 20_000_000  # 20 MB: larger than any phone photo
DEFAULT_MAX_PIXELS = 120_000_000  # 120 megapixels: a 12,000 x 9,000 photo still passes

logger = logging.getLogger(__name__)


class RowError(Exception):
    """One row cannot be scored: `code` is one of ERRORS."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@dataclass(frozen=True)
class ServingLimits:
    """What one `predict` call accepts: paths or not, and the largest image."""

    allow_paths: bool = False
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS

    @classmethod
    def from_environment(cls) -> ServingLimits:
        """The deployer's settings: server-side paths stay off unless explicitly switched on."""
        allow = os.environ.get(ALLOW_PATHS_VARIABLE, "").strip().lower() in {"1", "true", "yes"}
        return cls(
            allow_paths=allow,
            max_bytes=_positive_int_from(MAX_BYTES_VARIABLE, DEFAULT_MAX_BYTES),
            max_pixels=_positive_int_from(MAX_PIXELS_VARIABLE, DEFAULT_MAX_PIXELS),
        )


def _positive_int_from(variable: str, default: int) -> int:
    value = os.environ.get(variable)
    if not value:
        return default
    if not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"{variable}={value!r} must be a whole number ≥ 1.")
    return int(value)


class ImageModel(mlflow.pyfunc.PythonModel):
    """Images in, class probabilities out: what every strategy's deployable model shares.

    `predict` — what `mlflow models serve` runs for network clients — takes a DataFrame with an
    `image` column (base64-encoded image bytes) and returns `predicted_class`, one
    `probability_<class>` column per class (with several tasks: `predicted_<task>` and
    `probability_<task>_<class>` for every task; None where the row failed: `null` in JSON), `error`
    (empty, or a code of ERRORS) and `error_message`. It never opens a path a client names, unless
    the deployer sets TRANSFER_LEARNING_ALLOW_PATHS=true. `predict_files` is the trusted local
    entry (the evaluation and the predict pipeline): it reads the user's own image files.

    `temperatures` (task → T, fitted on held-out images by `models.calibration`) rescale what the
    subclass's `uncalibrated_task_probabilities` gives; a task without one keeps T = 1.
    """

    def __init__(
        self,
        strategy: str,
        classes: Sequence[str],
        image_size: int,
        batch_size: int = 64,
        tasks: Mapping[str, Sequence[str]] | None = None,
        temperatures: Mapping[str, float] | None = None,
    ) -> None:
        self.strategy = strategy
        self.classes = list(classes)  # the first task's
        self.tasks = {k: list(v) for k, v in (tasks or {SINGLE_TASK: classes}).items()}
        self.image_size = int(image_size)
        self.batch_size = batch_size
        self.temperatures = {task: float(t) for task, t in (temperatures or {}).items()}

    def __getstate__(self) -> dict[str, Any]:
        # Built networks (underscored attributes) are a cache: pickles carry the weights once.
        return {key: value for key, value in self.__dict__.items() if not key.startswith("_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("tasks", {SINGLE_TASK: self.classes})
        self.__dict__.setdefault("temperatures", {})

    def calibrated(self, temperatures: Mapping[str, float]) -> ImageModel:
        """A copy of this model whose probabilities are rescaled by `temperatures`."""
        model = copy.copy(self)
        model.temperatures = {task: float(t) for task, t in temperatures.items()}
        return model

    def predict(self, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """Probabilities for every row of base64 `image` bytes (a network client's request)."""
        limits = ServingLimits.from_environment()
        rows = model_input.to_dict("records")
        return self._score([lambda row=row: self._decode_row(row, limits) for row in rows])

    def predict_files(self, locations: Sequence[str]) -> pd.DataFrame:
        """Probabilities for the user's own image files (trusted: local, never a network client)."""
        return self._score([lambda where=where: self._read_file(where) for where in locations])

    def _score(self, decoders: list) -> pd.DataFrame:
        """Decode and score `batch_size` rows at a time; a row that fails gets an error code."""
        tasks = Tasks(self.tasks)
        probabilities = [np.full((len(decoders), size), np.nan) for size in tasks.sizes]
        errors = [""] * len(decoders)
        for start in range(0, len(decoders), self.batch_size):
            images = {}
            for position in range(start, min(start + self.batch_size, len(decoders))):
                try:
                    images[position] = decoders[position]()
                except RowError as error:
                    errors[position] = error.code
            if images:
                scored = self.task_probabilities(list(images.values()))
                for task_probabilities, task_scored in zip(probabilities, scored, strict=True):
                    task_probabilities[list(images)] = task_scored
        return self._frame(tasks, probabilities, errors)

    def probabilities(self, images: list[torch.Tensor]) -> np.ndarray:
        """Class probabilities (float64, rows sum to 1) of decoded uint8 (3, H, W) images (the
        first task's)."""
        return self.task_probabilities(images)[0]

    def task_probabilities(self, images: list[torch.Tensor]) -> list[np.ndarray]:
        """Every task's calibrated class probabilities (float64, rows sum to 1), in task order."""
        return [
            apply_temperature(scored, self.temperatures.get(task, 1.0))
            for task, scored in zip(
                self.tasks, self.uncalibrated_task_probabilities(images), strict=True
            )
        ]

    def uncalibrated_task_probabilities(self, images: list[torch.Tensor]) -> list[np.ndarray]:
        """Every task's class probabilities before temperature scaling."""
        raise NotImplementedError

    def _decode_row(self, row: dict[str, Any], limits: ServingLimits) -> torch.Tensor:
        # Missing cells arrive as None or NaN, depending on the column's other values.
        data, path = row.get("image"), row.get("path")
        if isinstance(data, str) and data:
            if len(data) > limits.max_bytes * 4 // 3 + 4:  # base64 of more than max_bytes
                raise RowError("too_large")
            try:
                data = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError) as error:
                raise RowError("bad_base64") from error
        if isinstance(data, bytes) and data:
            return self._decode_bytes(data, limits)
        if isinstance(path, str) and path:
            if not limits.allow_paths:
                logger.warning(
                    "Refused a row naming a server-side path (%s is off)", ALLOW_PATHS_VARIABLE
                )
                raise RowError("path_not_allowed")
            return self._read_file(path)
        raise RowError("missing_input")

    def _decode_bytes(self, data: bytes, limits: ServingLimits) -> torch.Tensor:
        """Checked against the limits from the header alone, then decoded as training decoded
        (large JPEGs at reduced scale): no train/serve skew."""
        if len(data) > limits.max_bytes:
            raise RowError("too_large")
        try:
            with Image.open(io.BytesIO(data)) as header:
                width, height = header.size
        except Image.DecompressionBombError as error:
            raise RowError("too_large") from error
        except (UnidentifiedImageError, OSError, ValueError) as error:
            logger.info("Unreadable image bytes: %s", error)
            raise RowError("not_an_image") from error
        if width * height > limits.max_pixels:
            raise RowError("too_large")
        try:
            return decode_image_bytes(data, self.image_size)
        except Exception as error:  # a truncated or corrupt body: PIL raises many types
            logger.info("Undecodable image bytes: %r", error)
            raise RowError("not_an_image") from error

    def _read_file(self, location: str) -> torch.Tensor:
        try:
            return load_rgb_tensor(location, self.image_size)
        except Exception as error:  # missing, unreadable or corrupt files alike
            logger.warning("Cannot read %s: %r", location, error)
            raise RowError("unreadable_file") from error

    def _frame(
        self, tasks: Tasks, probabilities: list[np.ndarray], errors: list[str]
    ) -> pd.DataFrame:
        """predicted_<task> and probability columns of every task, then error and message."""
        unread = np.array([code != "" for code in errors], dtype=bool)
        parts = []
        for task, task_probabilities in zip(tasks.names, probabilities, strict=True):
            columns = tasks.probability_columns(task)
            part = pd.DataFrame(task_probabilities, columns=columns)
            best = np.nan_to_num(task_probabilities, nan=-1).argmax(axis=1)
            names = np.asarray(tasks.classes[task], dtype=object)
            part.insert(0, tasks.predicted_column(task), np.where(unread, "", names[best]))
            if unread.any():
                # None, not NaN: `null` in the served JSON, which strict parsers accept.
                keep = np.repeat(~unread[:, None], len(columns), axis=1)
                part[columns] = part[columns].astype(object).where(keep, None)
            parts.append(part)
        frame = pd.concat(parts, axis=1)
        frame[ERROR_COLUMN] = errors
        frame[ERROR_MESSAGE_COLUMN] = [ERRORS.get(code, "") for code in errors]
        return frame


class ImageClassifier(ImageModel):
    """A network (+ an optional scikit-learn head on its features) with its preprocessing.

    The model carries everything it needs — architecture name, every weight, preprocessing, the
    head, the class names — so it predicts in a fresh process without downloads or the project.
    `network_state` is either a fine-tuned `Classifier`'s weights (backbone + linear head; `head`
    None) or a backbone's feature weights with `head` the scikit-learn pipeline on its features.
    With several tasks (`tasks`: task → class names, several label columns) the linear head has
    every task's classes side by side, or `head` is a `heads.TaskHeads`.
    """

    def __init__(  # noqa: PLR0913 (the model's plain description, as model.json stores it)
        self,
        strategy: str,
        classes: Sequence[str],
        backbone_name: str,
        image_size: int,
        network_state: dict[str, torch.Tensor],
        head: Any = None,
        batch_size: int = 64,
        tasks: Mapping[str, Sequence[str]] | None = None,
        temperatures: Mapping[str, float] | None = None,
        onnx_file: str | None = None,
    ) -> None:
        super().__init__(strategy, classes, image_size, batch_size, tasks, temperatures)
        self.backbone_name = backbone_name
        self.network_state = network_state
        self.head = head
        self.onnx_file = onnx_file  # the packaged export of the network, when there is one
        self._network = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("onnx_file", None)
        self._network = None

    @torch.inference_mode()
    def uncalibrated_task_probabilities(self, images: list[torch.Tensor]) -> list[np.ndarray]:
        if self._network is None:
            self._build()
        batch = self._collate(images)
        if self._onnx is not None:
            outputs = torch.from_numpy(self._onnx(batch))
        else:
            dtype = autocast_dtype(self._device)
            with torch.autocast(self._device.type, dtype=dtype, enabled=dtype is not None):
                outputs = self._network(self._normalise(batch)).float().cpu()
        sizes = [len(names) for names in self.tasks.values()]
        if self.head is None:
            return [torch.softmax(part.double(), dim=1).numpy() for part in outputs.split(sizes, 1)]
        heads = getattr(self.head, "heads", {SINGLE_TASK: self.head})  # TaskHeads or one head
        features = outputs.numpy()
        return [
            align_probabilities(head.predict_proba(features), head.classes_, size)
            for head, size in zip(heads.values(), sizes, strict=True)
        ]

    @property
    def engine(self) -> str:
        """What runs the network: onnxruntime (the packaged, checked `model.onnx`, on a CPU)
        or torch."""
        if self._network is None:
            self._build()
        return ONNXRUNTIME if self._onnx is not None else TORCH

    def uint8_network(self) -> torch.nn.Module:
        """The model's network on the CPU, its normalisation first: uint8 NCHW images of
        `image_size` px → logits (a trained network) or features (a head's backbone)."""
        return uint8_input(*self._torch_network())

    def _torch_network(self) -> tuple[torch.nn.Module, Any]:
        from transfer_learning.models.classifier import build_classifier

        settings = BackboneSettings(
            name=self.backbone_name, image_size=self.image_size, pretrained=False
        )
        if self.head is None:
            n_outputs = sum(len(names) for names in self.tasks.values())
            network, backbone = build_classifier(settings, n_outputs, seed=0)
        else:
            backbone = build_backbone(settings)
            network = backbone.features
        network.load_state_dict(self.network_state)
        return network.eval(), backbone.preprocessing

    def _build(self) -> None:
        network, preprocessing = self._torch_network()
        self._device = resolve_device("auto")
        self._collate = EvalCollate(preprocessing)
        self._onnx = None
        engine = resolve_engine(
            os.environ.get(ENGINE_VARIABLE, AUTO), self._device, setting=ENGINE_VARIABLE
        )
        if engine == ONNXRUNTIME and self.onnx_file:
            self._onnx = packaged_forward(
                uint8_input(network, preprocessing),
                self.image_size,
                Path(self.onnx_file),
                f"the {self.strategy} model",
                threads=usable_cores(),
            )
        self._network = network.to(self._device).to(memory_format=torch.channels_last)
        self._normalise = Normaliser(preprocessing).to(self._device)


class CombinedClassifier(ImageModel):
    """Several strategies' models, their (calibrated) probabilities averaged with `weights`.

    Each image is decoded once, at the largest member's size; every member then resizes and
    normalises it as it was trained to. A member with weight 0 is not run.
    """

    def __init__(
        self,
        strategy: str,
        members: Sequence[ImageModel],
        weights: Sequence[float],
        batch_size: int = 64,
        temperatures: Mapping[str, float] | None = None,
    ) -> None:
        first = members[0]
        for member in members[1:]:
            if member.tasks != first.tasks:
                raise ValueError(
                    f"A combination's members must predict the same classes: {member.strategy} "
                    f"has {member.tasks}, {first.strategy} {first.tasks}."
                )
        if len(weights) != len(members) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"Combination weights {list(weights)} must be ≥ 0, one per member.")
        image_size = max(member.image_size for member in members)
        super().__init__(strategy, first.classes, image_size, batch_size, first.tasks, temperatures)
        self.members = list(members)
        total = float(sum(weights))
        self.weights = [float(weight) / total for weight in weights]

    def uncalibrated_task_probabilities(self, images: list[torch.Tensor]) -> list[np.ndarray]:
        mixed: list[np.ndarray] = []
        for member, weight in zip(self.members, self.weights, strict=True):
            if weight == 0:
                continue
            scored = member.task_probabilities(images)
            mixed = (
                [weight * p for p in scored]
                if not mixed
                else [m + weight * p for m, p in zip(mixed, scored, strict=True)]
            )
        return mixed


def probability_matrix(
    predictions: pd.DataFrame, columns: Sequence[str] | None = None
) -> np.ndarray:
    """The probability columns of `ImageClassifier.predict`'s output, in class order (NaN where
    a row failed): `columns` (one task's: `Tasks.probability_columns`), or every
    `probability_` column (a single-task model's)."""
    if columns is None:
        columns = [c for c in predictions.columns if c.startswith(PROBABILITY_PREFIX)]
    return predictions[list(columns)].astype(np.float64).to_numpy()
