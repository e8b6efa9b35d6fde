"""The feature_transfer pipeline: features → head chosen on val, refitted on train+val →
calibrated image model (temperature fitted on the head's out-of-fold predictions); the same
again for every other seed of `evaluation.seeds`.

Its datasets live under the `feature_transfer.` namespace, like every strategy's, so that the
shared evaluation reads `feature_transfer.image_model` and `feature_transfer.training_summary`.
"""

from kedro.pipeline import Node, Pipeline

from transfer_learning.pipelines import bind
from transfer_learning.pipelines.templates.calibration import calibration_pipeline

from .nodes import fit_head, fit_other_seeds, package_head_model, split_features


def create_pipeline(**kwargs) -> Pipeline:
    nodes = Pipeline(
        [
            Node(
                func=split_features,
                inputs="image_features",
                outputs=["train_features", "val_features"],
                name="split_features",
            ),
            Node(
                func=fit_head,
                inputs=[
                    "train_features",
                    "val_features",
                    "class_names",
                    "params:head",
                    "params:seed",
                ],
                outputs=["model", "mlflow_model", "training_summary", "held_out_predictions"],
                name="fit_head",
            ),
            Node(
                func=fit_other_seeds,
                inputs=[
                    "train_features",
                    "val_features",
                    "class_names",
                    "params:head",
                    "params:seed",
                    "backbone",
                    "params:evaluation",
                ],
                outputs="other_seeds",
                name="fit_other_seeds",
            ),
            Node(
                func=bind(package_head_model, strategy="feature_transfer"),
                inputs=["model", "class_names", "backbone"],
                outputs="uncalibrated_model",
                name="package_image_model",
            ),
        ]
    )
    nodes += calibration_pipeline()
    return Pipeline(
        nodes,
        namespace="feature_transfer",
        inputs={"image_features", "class_names", "backbone"},
        parameters={"params:head", "params:seed", "params:evaluation"},
    )
