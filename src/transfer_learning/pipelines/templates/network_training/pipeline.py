"""The network-training template: recipe → train → best-on-val checkpoint → image model,
calibrated on val; the same again for every other seed of `evaluation.seeds`."""

from kedro.pipeline import Node, Pipeline

from transfer_learning.pipelines import bind
from transfer_learning.pipelines.templates.calibration import calibration_pipeline
from transfer_learning.serving.scoring import score_val_split

from .nodes import (
    package_network_model,
    resolve_recipe,
    split_train_val,
    train_model,
    train_other_seeds,
)


def network_training_pipeline(strategy: str) -> Pipeline:
    """Recipe → train → best-on-val checkpoint → image model calibrated on val, under the
    `strategy` namespace.

    The shared (resolved) `backbone` and the `finetune` block are overridden by the `<strategy>`
    block's own `backbone` and `finetune` keys; `training`, seed and device are shared.
    """
    nodes = Pipeline(
        [
            Node(
                func=split_train_val,
                inputs="image_index",
                outputs=["train_index", "val_index"],
                name="split_train_val",
            ),
            Node(
                func=bind(resolve_recipe, strategy=strategy),
                inputs=["backbone", "params:finetune", "params:overrides", "data_profile"],
                outputs="recipe",
                name="resolve_recipe",
            ),
            Node(
                func=bind(train_model, strategy=strategy),
                inputs=[
                    "train_index",
                    "val_index",
                    "class_names",
                    "recipe",
                    "params:training",
                    "params:seed",
                    "params:device",
                    "params:distributed",
                ],
                outputs=["model", "training_summary", "training_history"],
                name="train_model",
            ),
            Node(
                func=bind(train_other_seeds, strategy=strategy),
                inputs=[
                    "train_index",
                    "val_index",
                    "class_names",
                    "recipe",
                    "params:training",
                    "params:seed",
                    "params:device",
                    "params:distributed",
                    "params:evaluation",
                ],
                outputs="other_seeds",
                name="train_other_seeds",
            ),
            Node(
                func=bind(package_network_model, strategy=strategy),
                inputs=["model", "class_names"],
                outputs="uncalibrated_model",
                name="package_image_model",
            ),
            Node(
                func=score_val_split,
                inputs=["uncalibrated_model", "val_index"],
                outputs="held_out_predictions",
                name="score_val_split",
            ),
        ]
    )
    nodes += calibration_pipeline()
    shared = ("finetune", "training", "seed", "device", "distributed", "evaluation")
    return Pipeline(
        nodes,
        namespace=strategy,
        inputs={"image_index", "class_names", "data_profile", "backbone"},
        parameters={
            **{f"params:{name}": f"params:{name}" for name in shared},
            "params:overrides": f"params:{strategy}",
        },
    )
