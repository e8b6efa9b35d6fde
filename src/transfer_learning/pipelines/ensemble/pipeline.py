"""The ensemble pipeline: its members' calibrated image models → weights on val → a combined,
calibrated image model, evaluated, compared and served like every strategy's."""

from kedro.pipeline import Node, Pipeline

from transfer_learning.core.strategies import BY_NAME
from transfer_learning.pipelines import bind
from transfer_learning.pipelines.templates.calibration import calibration_pipeline

from .nodes import combine_models

STRATEGY = "ensemble"


def create_pipeline(**kwargs) -> Pipeline:
    """Reads `<member>.image_model`, `.held_out_predictions` and `.training_summary` of each
    member (the registry's `members`); the members' own pipelines produce them."""
    members = BY_NAME[STRATEGY].members
    # The members' datasets, by a local name (Kedro reserves dots for namespaces).
    member_inputs = {
        f"{member}_{name}": f"{member}.{name}"
        for name in ("image_model", "held_out_predictions", "training_summary")
        for member in members
    }
    nodes = Pipeline(
        [
            Node(
                func=bind(combine_models, members=members, strategy=STRATEGY),
                inputs=["class_names", *member_inputs],
                outputs=["uncalibrated_model", "held_out_predictions", "training_summary"],
                name="combine_models",
            )
        ]
    )
    return Pipeline(
        nodes + calibration_pipeline(),
        namespace=STRATEGY,
        inputs={"class_names": "class_names", **member_inputs},
    )
