"""The evaluation pipeline: one template, instantiated once per strategy under its namespace."""

from kedro.pipeline import Node, Pipeline

from .nodes import evaluate_test_predictions

STRATEGIES = ("feature_transfer", "parameter_transfer", "structure_transfer")


def evaluation_for(strategy: str) -> Pipeline:
    """Evaluation of `strategy`'s test predictions, reading and writing `<strategy>.*` datasets."""
    template = Pipeline(
        [
            Node(
                func=evaluate_test_predictions,
                inputs=["test_predictions", "training_summary", "class_names"],
                outputs=[
                    "metrics",
                    "per_class_metrics",
                    "confusion_matrix",
                    "reliability_diagram",
                    "mlflow_metrics",
                ],
                name="evaluate_test_predictions",
            )
        ]
    )
    return Pipeline(template, namespace=strategy, inputs={"class_names"})


def create_pipeline(**kwargs) -> Pipeline:
    return sum((evaluation_for(strategy) for strategy in STRATEGIES), Pipeline([]))
