"""The calibration template: uncalibrated model + held-out predictions → the image model."""

from kedro.pipeline import Node, Pipeline

from .nodes import calibrate_image_model


def calibration_pipeline() -> Pipeline:
    """`uncalibrated_model` and `held_out_predictions` → `image_model` and `calibration`.

    Unnamespaced: a strategy's pipeline adds it to its own nodes, inside its namespace.
    """
    return Pipeline(
        [
            Node(
                func=calibrate_image_model,
                inputs=["uncalibrated_model", "held_out_predictions", "class_names"],
                outputs=["image_model", "calibration"],
                name="calibrate_image_model",
            )
        ]
    )
