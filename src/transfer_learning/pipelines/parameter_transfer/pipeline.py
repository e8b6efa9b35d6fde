"""The parameter_transfer pipeline, and the fine-tuning template structure_transfer shares."""

from functools import partial, update_wrapper

from kedro.pipeline import Node, Pipeline

from .nodes import package_image_model, predict_test_split, split_index, train_model


def finetuning_pipeline(strategy: str) -> Pipeline:
    """Train → best-on-val checkpoint → test predictions, under the `strategy` namespace.

    The shared `finetune` recipe is overridden by the strategy's own `<strategy>.finetune`;
    backbone, seed and device are shared with the other pipelines.
    """
    train = update_wrapper(partial(train_model, strategy=strategy), train_model)
    package = update_wrapper(partial(package_image_model, strategy=strategy), package_image_model)
    nodes = Pipeline(
        [
            Node(
                func=split_index,
                inputs="image_index",
                outputs=["train_index", "val_index", "test_index"],
                name="split_index",
            ),
            Node(
                func=train,
                inputs=[
                    "train_index",
                    "val_index",
                    "class_names",
                    "params:backbone",
                    "params:finetune",
                    "params:finetune_overrides",
                    "params:seed",
                    "params:device",
                ],
                outputs=["model", "mlflow_model", "training_summary", "training_history"],
                name="train_model",
            ),
            Node(
                func=predict_test_split,
                inputs=["model", "test_index", "params:device"],
                outputs="test_predictions",
                name="predict_test_split",
            ),
            Node(
                func=package,
                inputs=["model", "class_names"],
                outputs=["image_model", "registered_image_model"],
                name="package_image_model",
            ),
        ]
    )
    return Pipeline(
        nodes,
        namespace=strategy,
        inputs={"image_index", "class_names"},
        parameters={
            "params:backbone": "params:backbone",
            "params:seed": "params:seed",
            "params:device": "params:device",
            "params:finetune": "params:finetune",
            "params:finetune_overrides": f"params:{strategy}.finetune",
        },
    )


def create_pipeline(**kwargs) -> Pipeline:
    return finetuning_pipeline("parameter_transfer")
