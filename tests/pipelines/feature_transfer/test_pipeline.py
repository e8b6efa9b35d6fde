import numpy as np
import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from kedro_datasets.pickle import PickleDataset
from scipy.special import softmax
from sklearn.datasets import load_digits

from tests.conftest import backbone_choice_inputs
from tests.oracles import classification_metrics, per_class_recall
from transfer_learning.data.index import build_image_index
from transfer_learning.data.settings import DataSettings
from transfer_learning.data.sources import pool_frame
from transfer_learning.pipelines import feature_extraction
from transfer_learning.pipelines.evaluation import evaluation_for
from transfer_learning.pipelines.feature_transfer import create_pipeline


def digits_features(poison_test: bool) -> dict[str, np.ndarray]:
    digits = load_digits()
    n = 900  # half the digits: enough for every class in every fold, half the fitting time
    split = np.array(["train", "val", "test"])[np.arange(n) % 3]
    features = digits.data[:n].astype(np.float32)
    labels = digits.target[:n].astype(np.int64)
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
        "image_size": np.array(8),
    }


def run(features, selection: str = "val"):
    catalog = DataCatalog(
        {
            "image_features": MemoryDataset(features),
            "class_names": MemoryDataset({"classes": [str(d) for d in range(10)]}),
            "params:head": MemoryDataset(
                {"type": "logistic_regression", "grid": {"C": [0.01, 1.0]}, "selection": selection}
            ),
            "params:seed": MemoryDataset(0),
        }
    )
    pipeline = create_pipeline().filter(
        node_names=["feature_transfer.split_features", "feature_transfer.fit_head"]
    )
    return SequentialRunner().run(pipeline, catalog)


@pytest.mark.parametrize("selection", ["val", "cv"])
def test_test_split_never_reaches_head_selection(selection):
    clean = run(digits_features(poison_test=False), selection)
    poisoned = run(digits_features(poison_test=True), selection)
    clean_summary = clean["feature_transfer.training_summary"].load()
    poisoned_summary = poisoned["feature_transfer.training_summary"].load()
    assert clean_summary["search"] == poisoned_summary["search"]
    assert clean_summary["best_params"] == poisoned_summary["best_params"]
    np.testing.assert_array_equal(
        clean["feature_transfer.model"].load()[-1].coef_,
        poisoned["feature_transfer.model"].load()[-1].coef_,
    )


def checked_calibration(outputs, image_model, index, report) -> float:
    """The head's temperature, fitted on its out-of-fold predictions on train+val."""
    calibration = outputs["feature_transfer.calibration"].load()
    temperature = image_model.temperatures["class"]
    assert calibration["temperature"] == temperature and temperature != 1.0
    assert calibration["held_out"] == "out-of-fold on train+val (5 folds)"
    assert calibration["held_out_images"] == (index["split"] != "test").sum()
    # What the temperature minimises; ECE, binned and noisy on 600 images, need not follow.
    assert calibration["held_out_log_loss_after"] < calibration["held_out_log_loss_before"]
    assert report["temperature"] == temperature
    return temperature


@pytest.mark.slow  # over 7 s alone: `make test` runs it, `make test-fast` does not
def test_feature_transfer_and_evaluation_end_to_end(tmp_path):
    """Real features of real digits → head → packaged model → test split scored by that model."""
    index, classes, _ = build_image_index(DataSettings(), seed=0)
    index = index.iloc[::3].reset_index(drop=True)
    catalog = DataCatalog(
        {
            "image_index": MemoryDataset(index),
            "unlabelled_index": MemoryDataset(pool_frame([])),  # no unlabelled images
            "class_names": MemoryDataset({"classes": classes}),
            "data_profile": MemoryDataset({"typical_short_side": 8}),
            "params:backbone": MemoryDataset({"name": "efficientnet_lite0", "image_size": 64}),
            "params:extraction": MemoryDataset({"cache_dir": None, "progress": False}),
            "params:device": MemoryDataset("cpu"),
            "params:distributed": MemoryDataset({}),
            **backbone_choice_inputs(),
            "params:head": MemoryDataset({"type": "logistic_regression"}),
            "params:seed": MemoryDataset(0),
            "params:evaluation": MemoryDataset({}),
            # Kept on disk: the runner releases in-memory intermediates once they are used.
            **{
                name: PickleDataset(filepath=str(tmp_path / f"{name}.pkl"))
                for name in (
                    "image_features",
                    "feature_transfer.image_model",
                    "feature_transfer.test_predictions",
                )
            },
        }
    )
    pipeline = (
        feature_extraction.create_pipeline()
        + create_pipeline()
        + evaluation_for("feature_transfer", register=False)
    )
    outputs = SequentialRunner().run(pipeline, catalog)
    report = outputs["feature_transfer.metrics"].load()
    test = index[index["split"] == "test"]
    assert report["n_test"] == len(test) and report["accuracy"] > 0.8
    assert report["fit_seconds"] > 0
    # Every metric as computed apart from the stored test predictions.
    scored = catalog.load("feature_transfer.test_predictions")
    oracle = classification_metrics(scored["label"], scored["probabilities"])
    for key, value in oracle.items():
        assert report[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    (panel, colour_bar) = outputs["feature_transfer.confusion_matrix"].load().axes
    assert colour_bar.get_ylabel() == "share of true class"
    shown = panel.images[0].get_array()
    np.testing.assert_allclose(
        np.diag(shown), per_class_recall(scored["label"], scored["probabilities"]), atol=1e-12
    )
    per_class = outputs["feature_transfer.per_class_metrics"].load()
    assert len(per_class) == 10

    # The served model's probabilities equal the head on the features extraction computed for
    # the same images, at the calibration's temperature: what is evaluated and deployed is what
    # was trained on (no skew).
    image_model = catalog.load("feature_transfer.image_model")
    temperature = checked_calibration(outputs, image_model, index, report)
    features = catalog.load("image_features")
    test_rows = features["split"] == "test"
    head_probabilities = image_model.head.predict_proba(features["features"][test_rows])
    expected = softmax(np.log(head_probabilities.astype(np.float64)) / temperature, axis=1)
    scored = catalog.load("feature_transfer.test_predictions")
    np.testing.assert_array_equal(scored["location"], features["location"][test_rows])
    # Two paths: the server scores 64 images a call, this check all at once, and the head
    # computes in float32 (scikit-learn keeps float32 features so), where BLAS blocks the two
    # products differently by CPU: torch.testing's float32 tolerance, not bit equality.
    np.testing.assert_allclose(scored["probabilities"], expected, rtol=1.3e-6, atol=1e-5)
