"""The evaluation pipeline: one template, instantiated once per strategy under its namespace.

Every strategy's pipeline ends in `<strategy>.image_model` (the deployable model),
`<strategy>.training_summary` and `<strategy>.other_seeds` (its models trained with the other
seeds of `evaluation.seeds`, none by default); this template scores the test split with those
models, evaluates them, and (in a strategy's run) registers the deployable one in MLflow.
"""

from collections.abc import Sequence

from kedro.pipeline import Node, Pipeline

from transfer_learning.pipelines import bind
from transfer_learning.serving.scoring import score_test_split, select_test_split

from .nodes import (
    evaluate_test_predictions,
    register_image_model,
    score_other_seeds,
)


def evaluation_for(strategy: str, register: bool = True) -> Pipeline:
    """Evaluation of `strategy`'s image model, reading and writing `<strategy>.*` datasets.

    `register=False` evaluates without registering new MLflow versions.
    """
    evaluate = bind(evaluate_test_predictions, strategy=strategy)
    nodes = [
        Node(select_test_split, "image_index", "test_index", name="select_test_split"),
        Node(
            score_test_split,
            ["image_model", "test_index"],
            "test_predictions",
            name="score_test_split",
        ),
        Node(
            score_other_seeds,
            ["other_seeds", "test_index"],
            "seed_predictions",
            name="score_other_seeds",
        ),
        Node(
            evaluate,
            ["test_predictions", "seed_predictions", "training_summary", "class_names"],
            [
                "metrics",
                "per_class_metrics",
                "confusion_matrix",
                "reliability_diagram",
                "mlflow_metrics",
                "resolved_parameters",
            ],
            name="evaluate_test_predictions",
        ),
    ]
    if register:
        nodes.append(
            Node(
                register_image_model,
                "image_model",
                "registered_image_model",
                name="register_image_model",
            )
        )
    return Pipeline(nodes, namespace=strategy, inputs={"image_index", "class_names"})


def create_pipeline(strategies: Sequence[str] = (), **kwargs) -> Pipeline:
    """Re-evaluate the stored image models of `strategies` (no new MLflow registrations)."""
    return sum((evaluation_for(name, register=False) for name in strategies), Pipeline([]))
