"""The data_ingestion pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import index_images


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=index_images,
                inputs=["params:data", "params:seed", "stored_label_issues"],
                outputs=[
                    "image_index",
                    "class_names",
                    "skipped_images",
                    "duplicates",
                    "data_profile",
                    "unlabelled_index",
                    "ingestion_metrics",
                ],
                name="index_images",
            )
        ]
    )
