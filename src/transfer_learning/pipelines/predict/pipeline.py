"""The predict pipeline: a folder of images → data/07_model_output/predictions.csv.

The model is `predict_model` in the catalog: the latest `image_model` of the strategy named by
`--params=predict.strategy=...` (feature_transfer by default); pin a version with
`--load-versions=predict_model:<version>`.
"""

from collections.abc import Sequence

from kedro.pipeline import Node, Pipeline

from transfer_learning.pipelines import bind

from .nodes import list_images, predict_images


def create_pipeline(strategies: Sequence[str] = (), **kwargs) -> Pipeline:
    """`strategies`: the registered strategy names that predict.strategy may name."""
    return Pipeline(
        [
            Node(
                func=bind(list_images, strategies=tuple(strategies)),
                inputs="params:predict",
                outputs="images_to_label",
                name="list_images",
            ),
            Node(
                func=predict_images,
                inputs=["predict_model", "images_to_label"],
                outputs="predictions",
                name="predict_images",
            ),
        ]
    )
