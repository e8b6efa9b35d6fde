"""One deployable model for every strategy: images in, class probabilities out (an MLflow pyfunc).

The model carries everything it needs — architecture name, every weight, preprocessing, the head,
the class names — so it predicts in a fresh process without downloads or the Kedro project. It is
also what scores the test split: the metrics describe exactly the model users deploy.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from transfer_learning.backbones import BackboneSettings, build_backbone
from transfer_learning.evaluation import align_probabilities
from transfer_learning.extraction import EvalCollate, Normaliser, autocast_dtype, resolve_device
from transfer_learning.images import decode_image_bytes, load_rgb_tensor

ERROR_COLUMN = "error"
PROBABILITY_PREFIX = "probability_"


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """A network (+ an optional scikit-learn head on its features) with its preprocessing.

    `network_state` is either a fine-tuned `Classifier`'s weights (backbone + linear head; `head`
    None) or a backbone's feature weights with `head` the scikit-learn pipeline on its features.

    `predict` takes a DataFrame with a `path` column (image files) or an `image` column (base64
    encoded image bytes, for `mlflow models serve`) and returns `predicted_class`, one
    `probability_<class>` column per class, and `error` (empty, or why that image could not be read).
    """

    def __init__(
        self,
        strategy: str,
        classes: Sequence[str],
        backbone_name: str,
        image_size: int,
        network_state: dict[str, torch.Tensor],
        head: Any = None,
        batch_size: int = 64,
    ) -> None:
        self.strategy = strategy
        self.classes = list(classes)
        self.backbone_name = backbone_name
        self.image_size = int(image_size)
        self.network_state = network_state
        self.head = head
        self.batch_size = batch_size
        self._network = None

    def __getstate__(self) -> dict[str, Any]:
        # The built network (underscored attributes) is a cache: pickles carry the weights once.
        return {key: value for key, value in self.__dict__.items() if not key.startswith("_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._network = None

    def predict(self, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """Probabilities for every row, decoded and scored `batch_size` rows at a time."""
        rows = model_input.to_dict("records")
        probabilities = np.full((len(rows), len(self.classes)), np.nan)
        errors = [""] * len(rows)
        for start in range(0, len(rows), self.batch_size):
            images = {}
            for position in range(start, min(start + self.batch_size, len(rows))):
                try:
                    images[position] = self._decode(rows[position])
                except Exception as error:  # any unreadable input is reported, never dropped
                    errors[position] = f"{type(error).__name__}: {error}"
            if images:
                probabilities[list(images)] = self.probabilities(list(images.values()))
        return self._frame(probabilities, errors)

    @torch.inference_mode()
    def probabilities(self, images: list[torch.Tensor]) -> np.ndarray:
        """Class probabilities (float64, rows sum to 1) of decoded uint8 (3, H, W) images."""
        if self._network is None:
            self._build()
        dtype = autocast_dtype(self._device)
        with torch.autocast(self._device.type, dtype=dtype, enabled=dtype is not None):
            outputs = self._network(self._normalise(self._collate(images))).float().cpu()
        if self.head is None:
            return torch.softmax(outputs.double(), dim=1).numpy()
        return align_probabilities(
            self.head.predict_proba(outputs.numpy()), self.head.classes_, len(self.classes)
        )

    def _build(self) -> None:
        from transfer_learning.finetune import build_classifier

        settings = BackboneSettings(
            name=self.backbone_name, image_size=self.image_size, pretrained=False
        )
        if self.head is None:
            network, backbone = build_classifier(settings, len(self.classes), seed=0)
        else:
            backbone = build_backbone(settings)
            network = backbone.features
        network.load_state_dict(self.network_state)
        self._device = resolve_device("auto")
        self._network = network.to(self._device).to(memory_format=torch.channels_last).eval()
        self._collate = EvalCollate(backbone.preprocessing)
        self._normalise = Normaliser(backbone.preprocessing).to(self._device)

    def _decode(self, row: dict[str, Any]) -> torch.Tensor:
        # Decoded as training decoded (large JPEGs at reduced scale): no train/serve skew.
        # Missing cells arrive as None or NaN, depending on the column's other values.
        path, data = row.get("path"), row.get("image")
        if isinstance(path, str) and path:
            return load_rgb_tensor(path, self.image_size)
        if isinstance(data, str) and data:
            return decode_image_bytes(base64.b64decode(data), self.image_size)
        if isinstance(data, bytes) and data:
            return decode_image_bytes(data, self.image_size)
        raise ValueError("each row needs a 'path' or a base64 'image'")

    def _frame(self, probabilities: np.ndarray, errors: list[str]) -> pd.DataFrame:
        frame = pd.DataFrame(
            probabilities, columns=[f"{PROBABILITY_PREFIX}{c}" for c in self.classes]
        )
        unread = np.isnan(probabilities).any(axis=1)
        best = np.nan_to_num(probabilities, nan=-1).argmax(axis=1)
        predicted = np.where(unread, "", np.asarray(self.classes, dtype=object)[best])
        frame.insert(0, "predicted_class", predicted)
        frame[ERROR_COLUMN] = errors
        return frame


def probability_matrix(predictions: pd.DataFrame) -> np.ndarray:
    """The `probability_<class>` columns of `ImageClassifier.predict`'s output, in class order."""
    columns = [c for c in predictions.columns if c.startswith(PROBABILITY_PREFIX)]
    return predictions[columns].to_numpy(np.float64)
