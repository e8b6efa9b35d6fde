"""The feature_extraction pipeline: which backbone (resolving `auto`), then its features (of the
image index, and of the unlabelled pool)."""

from kedro.pipeline import Node, Pipeline

from .nodes import extract_image_features, resolve_backbone


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=resolve_backbone,
                inputs=[
                    "params:backbone",
                    "data_profile",
                    "image_index",
                    "backbone_ranking",
                    "params:selection",
                    "params:extraction",
                    "params:seed",
                    "params:device",
                ],
                outputs=["backbone", "backbone_choice"],
                name="resolve_backbone",
            ),
            Node(
                func=extract_image_features,
                inputs=[
                    "image_index",
                    "backbone",
                    "params:extraction",
                    "params:device",
                    "params:distributed",
                ],
                outputs=["image_features", "extraction_metrics", "extraction_choice"],
                name="extract_image_features",
            ),
            # The unlabelled pool, by the same backbone (only pipelines that read it run this).
            Node(
                func=extract_image_features,
                inputs=[
                    "unlabelled_index",
                    "backbone",
                    "params:extraction",
                    "params:device",
                    "params:distributed",
                ],
                outputs=[
                    "unlabelled_features",
                    "unlabelled_extraction_metrics",
                    "unlabelled_extraction_choice",
                ],
                name="extract_unlabelled_features",
            ),
        ]
    )
