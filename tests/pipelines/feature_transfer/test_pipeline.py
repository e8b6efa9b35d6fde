import numpy as np
import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from sklearn.datasets import load_digits

from transfer_learning.pipelines.evaluation import evaluation_for
from transfer_learning.pipelines.feature_transfer import create_pipeline


def digits_features(poison_test: bool) -> dict[str, np.ndarray]:
    digits = load_digits()
    n = len(digits.target)
    split = np.array(["train", "val", "test"])[np.arange(n) % 3]
    features = digits.data.astype(np.float32).copy()
    labels = digits.target.astype(np.int64).copy()
    if poison_test:
        # If any of this reached scaling, selection or fitting, the head would change or fail.
        test = split == "test"
        features[test] = np.nan
        labels[test] = np.random.default_rng(0).permutation(labels[test])
    return {
        "features": features,
        "label": labels,
        "split": split,
        "location": np.array([f"sklearn-digits:{i}" for i in range(n)]),
    }


def run(features):
    catalog = DataCatalog(
        {
            "image_features": MemoryDataset(features),
            "class_names": MemoryDataset({"classes": [str(d) for d in range(10)]}),
            "params:head": MemoryDataset(
                {"type": "logistic_regression", "grid": {"C": [0.01, 1.0]}}
            ),
            "params:seed": MemoryDataset(0),
        }
    )
    pipeline = create_pipeline().filter(
        node_names=["feature_transfer.split_features", "feature_transfer.fit_head"]
    )
    return SequentialRunner().run(pipeline, catalog)


def test_test_split_never_reaches_head_selection():
    clean = run(digits_features(poison_test=False))
    poisoned = run(digits_features(poison_test=True))
    clean_summary = clean["feature_transfer.training_summary"].load()
    poisoned_summary = poisoned["feature_transfer.training_summary"].load()
    assert clean_summary["search"] == poisoned_summary["search"]
    assert clean_summary["best_params"] == poisoned_summary["best_params"]
    np.testing.assert_array_equal(
        clean["feature_transfer.model"].load()[-1].coef_,
        poisoned["feature_transfer.model"].load()[-1].coef_,
    )


def test_feature_transfer_and_evaluation_end_to_end():
    catalog = DataCatalog(
        {
            "image_features": MemoryDataset(digits_features(poison_test=False)),
            "class_names": MemoryDataset({"classes": [str(d) for d in range(10)]}),
            "params:head": MemoryDataset({"type": "logistic_regression"}),
            "params:seed": MemoryDataset(0),
        }
    )
    # Everything but packaging the deployable model (covered by tests/test_run.py).
    training = create_pipeline().filter(
        node_names=[
            "feature_transfer.split_features",
            "feature_transfer.fit_head",
            "feature_transfer.predict_test_split",
        ]
    )
    outputs = SequentialRunner().run(training + evaluation_for("feature_transfer"), catalog)
    report = outputs["feature_transfer.metrics"].load()
    for key in (
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "ece",
        "n_test",
        "fit_seconds",
        "top5_accuracy",
        "log_loss",
    ):
        assert key in report
    assert report["accuracy"] > 0.9 and report["n_test"] == 599
    assert report["strategy"] == "feature_transfer"
    assert outputs["feature_transfer.confusion_matrix"].load().axes
    assert len(outputs["feature_transfer.per_class_metrics"].load()) == 10
    assert outputs["feature_transfer.mlflow_metrics"].load()["accuracy"]["value"] == pytest.approx(
        report["accuracy"]
    )
