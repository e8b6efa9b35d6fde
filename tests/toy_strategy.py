"""A fourth strategy, added the way the registry says: this one module plus one `Strategy` entry.

nearest_neighbour_transfer: frozen pretrained features → a k-nearest-neighbour head.
"""

from __future__ import annotations

import time

import numpy as np
from kedro.pipeline import Node, Pipeline
from sklearn.neighbors import KNeighborsClassifier

from transfer_learning.models.backbones import BackboneSettings, build_backbone
from transfer_learning.reporting.statistics import EvaluationSettings
from transfer_learning.serving.classifier import ImageClassifier

NAME = "nearest_neighbour_transfer"


def fit_neighbours(image_features: dict[str, np.ndarray]) -> tuple[KNeighborsClassifier, dict]:
    started = time.perf_counter()
    train = image_features["split"] == "train"
    head = KNeighborsClassifier(n_neighbors=5).fit(
        image_features["features"][train], image_features["label"][train]
    )
    return head, {"fit_seconds": time.perf_counter() - started, "trainable_parameters": 0}


def package(head: KNeighborsClassifier, class_names: dict, backbone: dict) -> ImageClassifier:
    network = build_backbone(BackboneSettings.from_params(backbone))
    return ImageClassifier(
        NAME,
        class_names["classes"],
        network.name,
        network.preprocessing.image_size,
        network.features.state_dict(),
        head=head,
    )


def other_seeds(image_model: ImageClassifier, seed: int, evaluation: dict) -> list[dict]:
    """k-NN has no randomness: every other seed of `evaluation.seeds` gives the same model."""
    return [
        {"seed": other, "image_model": image_model, "fit_seconds": 0.0}
        for other in EvaluationSettings.from_params(evaluation).other_seeds(seed)
    ]


def create_pipeline(**kwargs) -> Pipeline:
    nodes = [
        Node(fit_neighbours, "image_features", ["head", "training_summary"], name="fit"),
        Node(package, ["head", "class_names", "backbone"], "image_model", name="package"),
        Node(
            other_seeds,
            ["image_model", "params:seed", "params:evaluation"],
            "other_seeds",
            name="other_seeds",
        ),
    ]
    return Pipeline(
        nodes,
        namespace=NAME,
        inputs={"image_features", "class_names", "backbone"},
        parameters={"params:seed", "params:evaluation"},
    )
