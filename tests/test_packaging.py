"""The packaged model and the stored head load without running code: tampered files are refused."""

from __future__ import annotations

import builtins
import os
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pytest
import skops.io
import torch
from kedro.io import DatasetError, Version
from PIL import Image
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.datasets import load_sample_images, make_classification

from transfer_learning.backbones import BackboneSettings, build_backbone
from transfer_learning.datasets import HeadDataset, ImageModelDataset
from transfer_learning.heads import HeadSettings, select_and_fit
from transfer_learning.packaging import ModelFileError, head_bytes, local_image_classifier
from transfer_learning.serving import ImageClassifier

CLASSES = ["china", "flower"]
LATEST = Version(None, None)  # what `versioned: true` gives a catalog entry


class Payload:
    """Unpickling this runs a command: what a pickled model file could hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class ForeignClassifier(ClassifierMixin, BaseEstimator):
    """A classifier from outside scikit-learn and this project (a head.type from elsewhere)."""

    def fit(self, features, labels):
        self.classes_ = np.unique(labels)
        return self

    def predict_proba(self, features):
        return np.full((len(features), len(self.classes_)), 1 / len(self.classes_))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name, pixels in zip(CLASSES, load_sample_images().images, strict=True):
        Image.fromarray(pixels).save(folder / f"{name}.jpg", quality=92)
        paths.append(str(folder / f"{name}.jpg"))
    return paths


@pytest.fixture(scope="module")
def head_model() -> ImageClassifier:
    """A feature_transfer model: backbone features + a prior-adjusted prototype head."""
    backbone = build_backbone(BackboneSettings(image_size=32, pretrained=False))
    features, labels = make_classification(
        40, backbone.feature_dim, n_informative=5, n_classes=2, random_state=0
    )
    head = select_and_fit(
        (features, labels),
        (features[:0], labels[:0]),
        HeadSettings(type="prototype", logit_adjustment=1.0),
        seed=0,
    ).model
    return ImageClassifier(
        "feature_transfer",
        CLASSES,
        backbone.name,
        32,
        backbone.features.state_dict(),
        head=head,
    )


def saved(model: ImageClassifier, folder: Path) -> tuple[ImageModelDataset, Path]:
    """The model saved as the catalog saves a strategy's image_model; the dataset and its files."""
    dataset = ImageModelDataset(str(folder / "image_model"), version=Version(None, "v1"))
    dataset.save(model)
    return ImageModelDataset(
        str(folder / "image_model"), version=LATEST
    ), folder / "image_model" / "v1"


def test_a_packaged_model_predicts_as_the_in_memory_one_and_holds_no_pickle(
    head_model, photos, tmp_path
):
    dataset, files = saved(head_model, tmp_path)
    loaded = dataset.load()
    assert not list(files.rglob("*.pkl"))
    assert sorted(p.name for p in (files / "image_model" / "artifacts").iterdir()) == [
        "head.skops",
        "model.json",
        "network.pt",
    ]
    expected = head_model.predict_files(photos)
    np.testing.assert_allclose(
        loaded.unwrap_python_model().predict_files(photos).filter(like="probability_"),
        expected.filter(like="probability_"),
        atol=1e-6,
    )
    # MLflow's own loader (what `mlflow models serve` runs) gives the same model.
    plain = mlflow.pyfunc.load_model(str(files / "image_model"))
    assert local_image_classifier(plain).classes == CLASSES


def test_a_head_replaced_by_one_holding_other_types_is_refused(head_model, tmp_path):
    dataset, files = saved(head_model, tmp_path)
    head_file = files / "image_model" / "artifacts" / "head.skops"
    head_file.write_bytes(skops.io.dumps({"classifier": builtins.exec}))
    with pytest.raises(DatasetError) as refused:
        dataset.load()
    message = str(refused.value.__cause__ or refused.value)
    assert str(head_file) in message and "builtins.exec" in message
    assert "not loaded" in message and "kedro run" in message


def test_weights_replaced_by_a_code_carrying_pickle_are_refused_without_running_it(
    head_model, tmp_path
):
    dataset, files = saved(head_model, tmp_path)
    marker = tmp_path / "ran"
    network_file = files / "image_model" / "artifacts" / "network.pt"
    torch.save({"weights": Payload(marker)}, network_file)
    with pytest.raises(DatasetError) as refused:
        dataset.load()
    message = str(refused.value.__cause__ or refused.value)
    assert str(network_file) in message and "weights_only=True" in message
    assert not marker.exists()


def test_a_model_folder_packaged_with_pickle_is_refused_before_mlflow_reads_it(
    head_model, tmp_path
):
    """An earlier version's (or an attacker's) python_model.pkl is never unpickled."""
    folder = tmp_path / "image_model" / "v0" / "image_model"
    folder.parent.mkdir(parents=True)
    mlflow.pyfunc.save_model(str(folder), python_model=head_model)
    with pytest.raises(DatasetError) as refused:
        ImageModelDataset(str(tmp_path / "image_model"), version=LATEST).load()
    message = str(refused.value.__cause__ or refused.value)
    assert "python_model.pkl" in message and str(folder) in message


def test_the_stored_head_round_trips_and_a_tampered_one_is_refused(tmp_path):
    features, labels = make_classification(60, 6, n_informative=4, n_classes=3, random_state=0)
    head = select_and_fit(
        (features, labels),
        (features[:0], labels[:0]),
        HeadSettings(type="logistic_regression", logit_adjustment=0.5),
        seed=0,
    ).model
    HeadDataset(str(tmp_path / "head.skops"), Version(None, "v1")).save(head)
    np.testing.assert_array_equal(
        HeadDataset(str(tmp_path / "head.skops"), LATEST).load().predict_proba(features),
        head.predict_proba(features),
    )
    stored = tmp_path / "head.skops" / "v1" / "head.skops"
    stored.write_bytes(skops.io.dumps(os.system))
    with pytest.raises(DatasetError, match="posix.system"):
        HeadDataset(str(tmp_path / "head.skops"), LATEST).load()
    stored.write_bytes(b"not a zip file")
    with pytest.raises(DatasetError, match="is not a skops head file"):
        HeadDataset(str(tmp_path / "head.skops"), LATEST).load()


def test_a_head_no_load_would_trust_is_refused_when_saved(tmp_path):
    head = ForeignClassifier().fit(np.zeros((4, 2)), [0, 1, 0, 1])
    with pytest.raises(ModelFileError, match="ForeignClassifier.*scikit-learn classifier"):
        head_bytes(head)
    with pytest.raises(DatasetError, match="ForeignClassifier"):
        HeadDataset(str(tmp_path / "head.skops"), Version(None, "v1")).save(head)
    assert not list(tmp_path.rglob("*.skops"))
