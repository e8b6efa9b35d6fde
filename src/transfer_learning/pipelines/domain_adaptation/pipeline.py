"""The domain_adaptation pipeline: target images → adapted models → one evaluation of all.

It reads what feature_transfer and parameter_transfer produce (their fitted head, fine-tuned
network and image models); the registry puts those pipelines in front of it. Every method is a
node of its own: one not asked for in `adaptation.methods`, or that does not apply, returns
nothing and is left out of the models and the report.
"""

from kedro.pipeline import Node, Pipeline

from .nodes import (
    adapt_batchnorm_statistics,
    adapt_with_mcc,
    adapt_with_tent,
    align_with_coral,
    evaluate_adaptation,
    extract_target_features,
    index_target,
    measure_domain_shift,
    package_adapted_models,
    register_adapted_models,
    report_adaptation,
    select_adaptation_images,
    standardise_with_target,
)

ADAPTED = ("coral_head", "target_standardised_head", "adabn_network", "tent_network", "mcc_network")


def create_pipeline(**kwargs) -> Pipeline:
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
                measure_domain_shift,
                ["image_features", "target_features", "params:adaptation", "params:seed"],
                "domain_shift",
                name="measure_domain_shift",
            ),
            Node(
                standardise_with_target,
                ["feature_transfer.model", "target_features", "params:adaptation"],
                "target_standardised_head",
                name="standardise_with_target",
            ),
            Node(
                align_with_coral,
                [
                    "feature_transfer.train_features",
                    "feature_transfer.val_features",
                    "target_features",
                    "params:head",
                    "params:adaptation",
                    "params:seed",
                ],
                "coral_head",
                name="align_with_coral",
            ),
            Node(
                adapt_batchnorm_statistics,
                ["parameter_transfer.model", "target_images", "params:adaptation", "params:device"],
                "adabn_network",
                name="adapt_batchnorm_statistics",
            ),
            Node(
                adapt_with_tent,
                [
                    "parameter_transfer.model",
                    "target_images",
                    "params:adaptation",
                    "params:seed",
                    "params:device",
                ],
                "tent_network",
                name="adapt_with_tent",
            ),
            Node(
                adapt_with_mcc,
                [
                    "parameter_transfer.model",
                    "parameter_transfer.recipe",
                    "parameter_transfer.train_index",
                    "target_images",
                    "params:adaptation",
                    "params:seed",
                    "params:device",
                ],
                "mcc_network",
                name="adapt_with_mcc",
            ),
            Node(
                package_adapted_models,
                ["class_names", "backbone", *ADAPTED],
                "adapted_image_models",
                name="package_adapted_models",
            ),
            Node(
                evaluate_adaptation,
                [
                    "adapted_image_models",
                    "feature_transfer.image_model",
                    "parameter_transfer.image_model",
                    "target_index",
                    "image_index",
                    "class_names",
                    "domain_shift",
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
