"""The feature_extraction pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import extract_image_features


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=extract_image_features,
                inputs=[
                    "image_index",
                    "data_profile",
                    "params:backbone",
                    "params:extraction",
                    "params:device",
                ],
                outputs=["image_features", "extraction_metrics"],
                name="extract_image_features",
            )
        ]
    )
