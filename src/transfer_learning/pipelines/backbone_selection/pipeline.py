"""The backbone_selection pipeline: `kedro run --pipelines=backbone_selection`."""

from kedro.pipeline import Node, Pipeline

from .nodes import rank_candidate_backbones, report_backbone_ranking


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=rank_candidate_backbones,
                inputs=[
                    "image_index",
                    "data_profile",
                    "params:selection",
                    "params:extraction",
                    "params:seed",
                    "params:device",
                ],
                outputs="backbone_ranking",
                name="rank_candidate_backbones",
            ),
            Node(
                func=report_backbone_ranking,
                inputs="backbone_ranking",
                outputs=[
                    "backbone_ranking_report",
                    "backbone_ranking_chart",
                    "backbone_selection_metrics",
                    "backbone_recommendation",
                ],
                name="report_backbone_ranking",
            ),
        ]
    )
