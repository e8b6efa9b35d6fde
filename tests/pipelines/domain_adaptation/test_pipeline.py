"""The domain_adaptation pipeline on real digits: a noisy target, poisoned target labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from kedro_datasets.pickle import PickleDataset
from PIL import Image
from sklearn.datasets import load_digits

from tests import toy_adaptation
from tests.oracles import classification_metrics
from transfer_learning.adaptation.base import AdaptationError
from transfer_learning.adaptation.registry import METHODS, AdaptationSettings
from transfer_learning.data.index import build_image_index
from transfer_learning.data.settings import DataSettings
from transfer_learning.models.backbones import BackboneSettings
from transfer_learning.models.classifier import build_classifier
from transfer_learning.pipelines.domain_adaptation import create_pipeline
from transfer_learning.pipelines.feature_extraction.nodes import extract_image_features
from transfer_learning.pipelines.feature_transfer.nodes import fit_head, split_features
from transfer_learning.serving.packaging import head_image_model, network_image_model
from transfer_learning.training.recipe import FinetuneSettings, Recipe

# Real networks adapted and scored several times: a couple of minutes.
pytestmark = pytest.mark.slow

BACKBONE = {
    "name": "efficientnet_lite0",
    "image_size": 32,
    "pretrained": True,
    "weights_path": None,
}
ADAPTATION = {"mcc": {"steps": 2}, "tent": {"batch_size": 16}}
ADAPTATION_NODES = [
    "select_adaptation_images",
    "extract_target_features",
    "measure_domain_shift",
    "adapt_with_target_standardisation",
    "adapt_with_coral",
    "adapt_with_adabn",
    "adapt_with_tent",
    "adapt_with_mcc",
    "package_adapted_models",
]


def noisy_digits(folder: Path, labelled: bool = True) -> Path:
    """Real handwritten digits under heavy pixel noise, one PNG each (class folders or not)."""
    digits = load_digits()
    rng = np.random.default_rng(0)
    # The first six of each class: 60 images, 30 held out as the target test when labelled.
    chosen = np.concatenate([np.flatnonzero(digits.target == d)[:6] for d in range(10)])
    for i in chosen:
        pixels = np.clip(digits.images[i] * 16 + rng.normal(0, 60, (8, 8)), 0, 255)
        where = folder / (str(digits.target[i]) if labelled else "batch") / f"{i}.png"
        where.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(where)
    return folder


@pytest.fixture(scope="module")
def source():
    """Source inputs the strategies' pipelines would produce: features, a fitted head, a
    (pretrained, briefly untrained-head) network checkpoint, their image models."""
    index, classes, _ = build_image_index(DataSettings(), seed=0)
    index = index.iloc[::4].reset_index(drop=True)
    features, _, _ = extract_image_features(
        index, BACKBONE, {"cache_dir": None, "progress": False}, "cpu", {}
    )
    train, val = split_features(features)
    head, _, _, _ = fit_head(train, val, {"classes": classes}, {"grid": {"C": [0.1]}}, 0)
    network, _ = build_classifier(BackboneSettings(**BACKBONE), len(classes), seed=0)
    checkpoint = {
        "state_dict": network.state_dict(),
        "n_classes": len(classes),
        "backbone_name": "efficientnet_lite0",
        "image_size": 32,
    }
    class_names = {"classes": classes}
    return {
        "image_index": index,
        "class_names": class_names,
        "backbone": BACKBONE,
        "image_features": features,
        "feature_transfer.train_features": train,
        "feature_transfer.val_features": val,
        "feature_transfer.model": head,
        "feature_transfer.image_model": head_image_model(
            head, class_names, BackboneSettings(**BACKBONE), "feature_transfer"
        ),
        "parameter_transfer.model": checkpoint,
        "parameter_transfer.image_model": network_image_model(
            checkpoint, class_names, "parameter_transfer"
        ),
        "parameter_transfer.recipe": Recipe(
            BackboneSettings(**BACKBONE),
            FinetuneSettings(batch_size=16, epochs=1, hflip=False, patience=None, freeze_stride=4),
        ),
        "parameter_transfer.train_index": index[index["split"] == "train"].reset_index(drop=True),
    }


KEPT = ("domain_adaptation_metrics", "target_index", "adapted_image_models")


def run(
    source: dict,
    nodes: list[str] | None,
    keep: Path | None = None,
    methods: tuple = METHODS,
    **inputs,
) -> dict:
    """The pipeline's free outputs, and (with `keep`, a folder) the datasets in KEPT, which
    later nodes consume: the runner would release them from memory."""
    kept = (
        {name: PickleDataset(filepath=str(keep / f"{name}.pkl")) for name in KEPT} if keep else {}
    )
    catalog = DataCatalog(
        {
            **kept,
            **{name: MemoryDataset(value, copy_mode="assign") for name, value in source.items()},
            "params:adaptation": MemoryDataset(ADAPTATION),
            "params:extraction": MemoryDataset({"cache_dir": None, "progress": False}),
            "params:head": MemoryDataset({"grid": {"C": [0.1, 1.0]}}),
            "params:seed": MemoryDataset(0),
            "params:device": MemoryDataset("cpu"),
            "params:distributed": MemoryDataset({}),
            **{name: MemoryDataset(value) for name, value in inputs.items()},  # over the above
        }
    )
    pipeline = create_pipeline(methods)
    if nodes is not None:
        pipeline = pipeline.filter(node_names=nodes)
    outputs = SequentialRunner().run(pipeline, catalog)
    return {name: dataset.load() for name, dataset in {**outputs, **kept}.items()}


def target_index(source: dict, folder: Path) -> pd.DataFrame:
    data = {"source": "digits", "target_path": str(folder)}
    outputs = run(source, ["index_target"], **{"params:data": data})
    return outputs["target_index"]


def test_target_labels_never_reach_adaptation(source, tmp_path):
    clean = target_index(source, noisy_digits(tmp_path / "target"))
    assert set(clean["split"]) == {"adapt", "test"} and (clean["label"] >= 0).all()
    poisoned = clean.copy()
    # If labels reached any method, its model would change; if test rows did, it would fail.
    poisoned["label"] = np.random.default_rng(0).permutation(poisoned["label"].to_numpy())
    poisoned["class_name"] = "poison"
    test = poisoned["split"] == "test"
    poisoned.loc[test, "location"] = [f"/nonexistent/{i}.png" for i in range(test.sum())]

    adapted_clean = run(source, ADAPTATION_NODES, target_index=clean)["adapted_image_models"]
    adapted_poisoned = run(source, ADAPTATION_NODES, target_index=poisoned)["adapted_image_models"]
    assert sorted(adapted_clean) == [
        "feature_transfer_coral",
        "feature_transfer_target_standardisation",
        "parameter_transfer_adabn",
        "parameter_transfer_mcc",
        "parameter_transfer_tent",
    ]
    for name, model in adapted_clean.items():
        other = adapted_poisoned[name]
        for key, tensor in model.network_state.items():
            torch.testing.assert_close(tensor, other.network_state[key], rtol=0, atol=0)
        if model.head is not None:
            np.testing.assert_array_equal(model.head[-1].coef_, other.head[-1].coef_)
            np.testing.assert_array_equal(model.head[0].mean_, other.head[0].mean_)


def test_methods_follow_adaptation_methods(source, tmp_path):
    index = target_index(source, noisy_digits(tmp_path / "target"))
    only = run(
        source,
        ADAPTATION_NODES,
        target_index=index,
        **{"params:adaptation": {"methods": ["coral", "adabn"]}},
    )
    assert sorted(only["adapted_image_models"]) == [
        "feature_transfer_coral",
        "parameter_transfer_adabn",
    ]


def test_evaluation_scores_every_model_on_the_target_test_and_reports(source, tmp_path):
    outputs = run(
        source,
        None,
        keep=tmp_path,
        **{"params:data": {"source": "digits", "target_path": str(noisy_digits(tmp_path / "t"))}},
    )
    metrics = outputs["domain_adaptation_metrics"]
    assert set(metrics["feature_transfer"]) == {"source_only", "target_standardisation", "coral"}
    assert set(metrics["parameter_transfer"]) == {"source_only", "adabn", "tent", "mcc"}
    assert metrics["n_target_test"] == 30 and metrics["n_target_adapt"] == 30
    # source_only is the strategy's own image model: its target accuracy, computed here apart.
    target = outputs["target_index"]
    test = target[target["split"] == "test"]
    served = source["feature_transfer.image_model"].predict_files(test["location"].tolist())
    expected = (served["predicted_class"].astype(int).to_numpy() == test["label"].to_numpy()).mean()
    row = metrics["feature_transfer"]["source_only"]
    # The same model on the same files in the same batch: the same probabilities; only the two
    # metric formulas (float64) differ, by a few roundings.
    assert row["target_accuracy"] == pytest.approx(expected, abs=1e-12)
    probabilities = served.filter(like="probability_").to_numpy(dtype=float)
    oracle = classification_metrics(test["label"].to_numpy(), probabilities)
    assert row["model"] == "feature_transfer"
    assert row["target_ece"] == pytest.approx(oracle["ece"], abs=1e-9)
    assert metrics["parameter_transfer"]["tent"]["model"] == "parameter_transfer_tent"
    report = outputs["domain_adaptation_report"]
    assert report.index("How different") < report.index("Target test accuracy")
    assert "| parameter_transfer | adabn |" in report
    assert outputs["domain_adaptation_chart"].axes
    shift = metrics["domain_shift"]["domain_classifier_accuracy"]
    assert shift >= 0.75  # clean digits vs heavy noise, 30 held-out images: easy to tell apart
    mlflow_metrics = outputs["domain_adaptation_mlflow_metrics"]
    assert "parameter_transfer.adabn.target_accuracy" in mlflow_metrics


def test_unlabelled_target_still_adapts_and_says_there_is_no_target_test(source, tmp_path):
    folder = noisy_digits(tmp_path / "target", labelled=False)
    outputs = run(
        source,
        None,
        keep=tmp_path,
        **{
            "params:data": {"source": "digits", "target_path": str(folder)},
            "params:adaptation": {"methods": ["target_standardisation", "adabn"]},
        },
    )
    metrics = outputs["domain_adaptation_metrics"]
    assert metrics["n_target_test"] == 0 and metrics["n_target_adapt"] == 60
    row = metrics["parameter_transfer"]["adabn"]
    assert row["target_accuracy"] is None
    # Its accuracy on the source test split, computed here apart with the adapted model.
    adapted = outputs["adapted_image_models"]["parameter_transfer_adabn"]
    index = source["image_index"]
    test = index[index["split"] == "test"]
    served = adapted.predict_files(test["location"].tolist())
    expected = (served["predicted_class"].astype(int).to_numpy() == test["label"].to_numpy()).mean()
    # The node scored the same files in the same batches: equal predictions, ratios rounded alike.
    assert row["source_test_accuracy"] == pytest.approx(expected, abs=1e-12)
    assert "no labelled target test split" in outputs["domain_adaptation_report"]
    assert sorted(outputs["adapted_image_models"]) == [
        "feature_transfer_target_standardisation",
        "parameter_transfer_adabn",
    ]


def test_a_toy_method_is_one_module_and_one_registry_line(source, tmp_path):
    registry = (*METHODS, toy_adaptation.METHOD)
    data = {"source": "digits", "target_path": str(noisy_digits(tmp_path / "t"))}
    with pytest.raises(AdaptationError, match="adaptation.unchanged_copy.copies=2"):
        run(source, None, methods=registry, **{"params:data": data,
            "params:adaptation": {"unchanged_copy": {"copies": 2}}})  # fmt: skip
    outputs = run(
        source,
        None,
        keep=tmp_path,
        methods=registry,
        **{"params:data": data, "params:adaptation": {"methods": ["unchanged_copy"]}},
    )
    assert sorted(outputs["adapted_image_models"]) == ["parameter_transfer_unchanged_copy"]
    rows = outputs["domain_adaptation_metrics"]["parameter_transfer"]
    assert set(rows) == {"source_only", "unchanged_copy"}
    for score in ("target_accuracy", "target_ece", "source_test_accuracy"):
        assert rows["unchanged_copy"][score] == rows["source_only"][score]
    assert "| parameter_transfer | unchanged_copy |" in outputs["domain_adaptation_report"]
    # The shipped registry does not know it: named there, it is refused with the list.
    with pytest.raises(AdaptationError, match="unchanged_copy is not a method"):
        AdaptationSettings.from_params({"methods": ["unchanged_copy"]})
