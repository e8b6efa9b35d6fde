"""The comparison pipeline."""

from kedro.pipeline import Node, Pipeline

from .nodes import compare_strategies


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=compare_strategies,
                inputs=[
                    "feature_transfer.metrics",
                    "parameter_transfer.metrics",
                    "structure_transfer.metrics",
                ],
                outputs=["comparison_report", "comparison_chart"],
                name="compare_strategies",
            )
        ]
    )
