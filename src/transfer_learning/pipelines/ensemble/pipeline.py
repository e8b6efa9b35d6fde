"""The ensemble pipeline: its members' calibrated image models → weights on val → a combined,
calibrated image model, evaluated, compared and served like every strategy's."""

from kedro.pipeline import Node, Pipeline

from transfer_learning.core.strategies import BY_NAME
from transfer_learning.pipelines import bind
from transfer_learning.pipelines.templates.calibration import calibration_pipeline

from .nodes import combine_models, combine_other_seeds

STRATEGY = "ensemble"


def create_pipeline(**kwargs) -> Pipeline:
    """Reads `<member>.image_model`, `.held_out_predictions`, `.training_summary` and
    `.other_seeds` of each member (the registry's `members`); the members' own pipelines
    produce them."""
    members = BY_NAME[STRATEGY].members

    def by_local_name(*names: str) -> dict[str, str]:
        """The members' datasets, by a local name (Kedro reserves dots for namespaces)."""
        return {f"{member}_{name}": f"{member}.{name}" for name in names for member in members}

    trained = by_local_name("image_model", "held_out_predictions", "training_summary")
    other_seeds = by_local_name("other_seeds")
    nodes = Pipeline(
        [
            Node(
                func=bind(combine_models, members=members, strategy=STRATEGY),
                inputs=["class_names", *trained],
                outputs=["uncalibrated_model", "held_out_predictions", "training_summary"],
                name="combine_models",
            ),
            Node(
                func=bind(combine_other_seeds, members=members, strategy=STRATEGY),
                inputs=["class_names", *other_seeds],
                outputs="other_seeds",
                name="combine_other_seeds",
            ),
        ]
    )
    return Pipeline(
        nodes + calibration_pipeline(),
        namespace=STRATEGY,
        inputs={"class_names": "class_names", **trained, **other_seeds},
    )
