"""The data_quality pipeline: the user's own data mistakes, found before they cost accuracy.

It reads the cached features (the registry puts ingestion and feature extraction in front of it)
and the image index, and changes neither: it reports, for a person to act on.
"""

from kedro.pipeline import Node, Pipeline

from .nodes import (
    find_label_issues_in_features,
    find_outliers,
    find_train_val_duplicates,
    report_data_quality,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=find_label_issues_in_features,
                inputs=["image_features", "class_names", "params:head", "params:seed"],
                outputs=["label_issues", "test_label_issues", "label_noise_rates"],
                name="find_label_issues",
            ),
            Node(
                func=find_outliers,
                inputs=["image_features", "class_names"],
                outputs="outliers",
                name="find_outliers",
            ),
            Node(
                func=find_train_val_duplicates,
                inputs=["image_index", "params:data"],
                outputs="train_val_duplicates",
                name="find_train_val_duplicates",
            ),
            Node(
                func=report_data_quality,
                inputs=[
                    "label_issues",
                    "test_label_issues",
                    "label_noise_rates",
                    "outliers",
                    "train_val_duplicates",
                ],
                outputs=["data_quality_report", "label_issues_montage", "data_quality_metrics"],
                name="report_data_quality",
            ),
        ]
    )
