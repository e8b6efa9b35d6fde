"""The domain_adaptation pipeline: target images → adapted models → one evaluation of all.

It adapts the pretrained strategy of each kind (core.strategies): for the features kind, its
fitted head and the features it saw; for the network kind, its fine-tuned network. The registry
puts those strategies' pipelines in front of it. Every registered method (adaptation.registry) is
a node of its own: one not asked for in `adaptation.methods`, or that does not apply, returns
nothing and is left out of the models and the report.
"""

from collections.abc import Sequence

from kedro.pipeline import Node, Pipeline

from transfer_learning.adaptation.base import AdaptationMethod
from transfer_learning.adaptation.registry import METHODS, base_strategy
from transfer_learning.core.strategies import FEATURES, pretrained_strategies
from transfer_learning.pipelines import bind

from .nodes import (
    adapt_head,
    adapt_network,
    evaluate_adaptation,
    extract_target_features,
    index_target,
    measure_domain_shift,
    package_adapted_models,
    register_adapted_models,
    report_adaptation,
    select_adaptation_images,
)


def source_strategies() -> tuple[str, ...]:
    """The strategies whose models are adapted: the pretrained one of each kind."""
    return pretrained_strategies()


def _adaptation_node(method: AdaptationMethod, registry: Sequence[AdaptationMethod]) -> Node:
    strategy = base_strategy(method)
    if method.kind == FEATURES:
        func = adapt_head
        inputs = [
            f"{strategy}.model",
            f"{strategy}.train_features",
            f"{strategy}.val_features",
            "target_features",
            "params:head",
        ]
    else:
        func = adapt_network
        inputs = [
            f"{strategy}.model",
            f"{strategy}.recipe",
            f"{strategy}.train_index",
            "target_images",
        ]
    extra = ["params:adaptation", "params:seed"] + (
        ["params:device"] if func is adapt_network else []
    )
    return Node(
        bind(func, method=method, registry=tuple(registry)),
        inputs + extra,
        f"{method.name}_adapted",
        name=f"adapt_with_{method.name}",
    )


def create_pipeline(methods: Sequence[AdaptationMethod] = METHODS, **kwargs) -> Pipeline:
    registry = tuple(methods)
    strategies = source_strategies()
    adapted = [f"{method.name}_adapted" for method in registry]
    return Pipeline(
        [
            Node(
                index_target,
                ["params:data", "class_names", "params:seed"],
                "target_index",
                name="index_target",
            ),
            Node(
                select_adaptation_images,
                "target_index",
                "target_images",
                name="select_adaptation_images",
            ),
            Node(
                extract_target_features,
                ["target_images", "backbone", "params:extraction", "params:device"],
                "target_features",
                name="extract_target_features",
            ),
            Node(
                bind(measure_domain_shift, registry=registry),
                ["image_features", "target_features", "params:adaptation", "params:seed"],
                "domain_shift",
                name="measure_domain_shift",
            ),
            *(_adaptation_node(method, registry) for method in registry),
            Node(
                bind(package_adapted_models, registry=registry),
                ["class_names", "backbone", *adapted],
                "adapted_image_models",
                name="package_adapted_models",
            ),
            Node(
                bind(evaluate_adaptation, strategies=strategies, registry=registry),
                [
                    "adapted_image_models",
                    "target_index",
                    "image_index",
                    "class_names",
                    "domain_shift",
                    *(f"{strategy}.image_model" for strategy in strategies),
                ],
                ["domain_adaptation_metrics", "domain_adaptation_mlflow_metrics"],
                name="evaluate_adaptation",
            ),
            Node(
                report_adaptation,
                ["domain_adaptation_metrics", "params:data"],
                ["domain_adaptation_report", "domain_adaptation_chart"],
                name="report_adaptation",
            ),
            Node(
                register_adapted_models,
                "adapted_image_models",
                "registered_adapted_image_models",
                name="register_adapted_models",
            ),
        ]
    )
