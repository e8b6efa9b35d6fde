"""The label_next pipeline: rank the unlabelled pool for labelling (the registry puts ingestion
and the pool's feature extraction in front of it)."""

from kedro.pipeline import Node, Pipeline

from .nodes import propose_next_labels


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=propose_next_labels,
                inputs=[
                    "image_features",
                    "unlabelled_features",
                    "unlabelled_index",
                    "class_names",
                    "params:label_next",
                    "params:head",
                    "params:data",
                    "params:seed",
                ],
                outputs=[
                    "label_next",
                    "label_next_manifest",
                    "label_next_montage",
                    "label_next_metrics",
                    "label_next_choice",
                ],
                name="propose_next_labels",
            )
        ]
    )
