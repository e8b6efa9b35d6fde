"""The learning_curve pipeline: nested training sets → every strategy at every size → report.

Features are extracted once (the shared feature_extraction stage) and reused by every point of
a strategy of the features kind; a strategy of the network kind trains one network per point.
"""

from kedro.pipeline import Node, Pipeline

from transfer_learning.core.strategies import FEATURES, NETWORK, names_of_kind
from transfer_learning.pipelines import bind

from .nodes import (
    draw_curve_subsets,
    finetuning_curve,
    head_curve,
    report_learning_curve,
)

HEADS = names_of_kind(FEATURES)  # one head fitted per point on the cached features
FINETUNING = names_of_kind(NETWORK)  # one network trained per point


def create_pipeline(**kwargs) -> Pipeline:
    heads = [
        Node(
            func=bind(head_curve, strategy=strategy),
            inputs=[
                "image_features",
                "curve_subsets",
                "class_names",
                "params:head",
                "params:curve",
            ],
            outputs=f"{strategy}_curve",
            name=f"{strategy}_curve",
        )
        for strategy in HEADS
    ]
    finetuning = [
        Node(
            func=bind(finetuning_curve, strategy=strategy),
            inputs=[
                "curve_subsets",
                "image_index",
                "class_names",
                "backbone",
                "params:finetune",
                f"params:{strategy}",
                "data_profile",
                "params:training",
                "params:curve",
                "params:seed",
                "params:device",
            ],
            outputs=f"{strategy}_curve",
            name=f"{strategy}_curve",
        )
        for strategy in FINETUNING
    ]
    return Pipeline(
        [
            Node(
                func=draw_curve_subsets,
                inputs=["image_index", "class_names", "params:curve", "params:seed"],
                outputs="curve_subsets",
                name="draw_curve_subsets",
            ),
            *heads,
            *finetuning,
            Node(
                func=report_learning_curve,
                inputs=[
                    "image_index",
                    *(f"{strategy}_curve" for strategy in HEADS + FINETUNING),
                ],
                outputs=[
                    "learning_curve",
                    "learning_curve_runs",
                    "learning_curve_report",
                    "learning_curve_plot",
                ],
                name="report_learning_curve",
            ),
        ],
        namespace="learning_curve",
        inputs={"image_index", "image_features", "class_names", "backbone", "data_profile"},
        parameters={
            "params:curve",
            "params:head",
            "params:finetune",
            "params:training",
            "params:seed",
            "params:device",
            *(f"params:{strategy}" for strategy in FINETUNING),
        },
        outputs={
            "learning_curve",
            "learning_curve_runs",
            "learning_curve_report",
            "learning_curve_plot",
        },
    )
