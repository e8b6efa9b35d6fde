"""The network-training template: recipe → train → best-on-val checkpoint → image model."""

from kedro.pipeline import Node, Pipeline

from transfer_learning.pipelines import bind

from .nodes import package_network_model, resolve_recipe, split_train_val, train_model


def network_training_pipeline(strategy: str) -> Pipeline:
    """Recipe → train → best-on-val checkpoint → image model, under the `strategy` namespace.

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
                func=bind(package_network_model, strategy=strategy),
                inputs=["model", "class_names"],
                outputs="image_model",
                name="package_image_model",
            ),
        ]
    )
    shared = ("finetune", "training", "seed", "device", "distributed")
    return Pipeline(
        nodes,
        namespace=strategy,
        inputs={"image_index", "class_names", "data_profile", "backbone"},
        parameters={
            **{f"params:{name}": f"params:{name}" for name in shared},
            "params:overrides": f"params:{strategy}",
        },
    )
