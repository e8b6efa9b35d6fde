"""One deployable model for every strategy: images in, class probabilities out (an MLflow pyfunc).

The model carries everything it needs — architecture name, every weight, preprocessing, the head,
the class names — so it predicts in a fresh process without downloads or the Kedro project.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from PIL import Image

from transfer_learning.backbones import BackboneSettings, build_backbone
from transfer_learning.evaluation import align_probabilities
from transfer_learning.extraction import EvalCollate, Normaliser
from transfer_learning.images import load_rgb_tensor, to_rgb

ERROR_COLUMN = "error"


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Backbone (+ sklearn head, or fine-tuned linear head) with its preprocessing.

    `predict` takes a DataFrame with a `path` column (image files) or an `image` column (base64
    encoded image bytes, for `mlflow models serve`) and returns one probability column per class,
    `predicted_class`, and `error` (empty, or why that image could not be read).
    """

    def __init__(
        self,
        strategy: str,
        classes: list[str],
        backbone_name: str,
        image_size: int,
        network_state: dict[str, torch.Tensor],
        head: Any = None,
    ) -> None:
        self.strategy = strategy
        self.classes = list(classes)
        self.backbone_name = backbone_name
        self.image_size = int(image_size)
        self.network_state = network_state  # features (feature_transfer) or features+head
        self.head = head  # the sklearn pipeline of feature_transfer, else None
        self._network = None

    def _build(self):
        from transfer_learning.finetune import Classifier

        backbone = build_backbone(
            BackboneSettings(self.backbone_name, self.image_size, pretrained=False)
        )
        if self.head is None:
            network = Classifier(backbone.features, backbone.feature_dim, len(self.classes))
        else:
            network = backbone.features
        network.load_state_dict(self.network_state)
        self._network = network.eval()
        self._collate = EvalCollate(backbone.preprocessing)
        self._normalise = Normaliser(backbone.preprocessing)

    def predict(
        self, context, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        if self._network is None:
            self._build()
        images, errors = [], []
        for row in model_input.to_dict("records"):
            try:
                images.append(_decode(row))
                errors.append("")
            except Exception as error:  # any unreadable input is reported, never dropped
                images.append(None)
                errors.append(f"{type(error).__name__}: {error}")
        probabilities = np.full((len(images), len(self.classes)), np.nan)
        readable = [i for i, image in enumerate(images) if image is not None]
        for start in range(0, len(readable), 64):
            chunk = readable[start : start + 64]
            probabilities[chunk] = self._probabilities([images[i] for i in chunk])
        frame = pd.DataFrame(probabilities, columns=[f"probability_{c}" for c in self.classes])
        predicted = np.where(
            np.isnan(probabilities).any(axis=1),
            "",
            np.asarray(self.classes, dtype=object)[
                np.nan_to_num(probabilities, nan=-1).argmax(axis=1)
            ],
        )
        frame.insert(0, "predicted_class", predicted)
        frame[ERROR_COLUMN] = errors
        return frame

    @torch.inference_mode()
    def _probabilities(self, images: list[torch.Tensor]) -> np.ndarray:
        batch = self._normalise(self._collate(images))
        if self.head is None:
            return torch.softmax(self._network(batch).double(), dim=1).numpy()
        features = self._network(batch).numpy()
        return align_probabilities(
            self.head.predict_proba(features), self.head.classes_, len(self.classes)
        )


def _decode(row: dict[str, Any]) -> torch.Tensor:
    if row.get("path"):
        return load_rgb_tensor(str(row["path"]))
    data = row.get("image")
    if data is None:
        raise ValueError("each row needs a 'path' or a base64 'image'")
    raw = base64.b64decode(data) if isinstance(data, str) else bytes(data)
    with Image.open(io.BytesIO(raw)) as image:
        image.load()
        pixels = np.asarray(to_rgb(image), dtype=np.uint8).copy()
    return torch.from_numpy(pixels).permute(2, 0, 1)
