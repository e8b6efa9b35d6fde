"""Domain adaptation methods against independent oracles, on real images and real networks."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from tests.conftest import write_image
from transfer_learning.adaptation.adabn import adapt_batchnorm
from transfer_learning.adaptation.base import AdaptationError
from transfer_learning.adaptation.coral import CoralTransform
from transfer_learning.adaptation.mcc import mcc_loss
from transfer_learning.adaptation.network import TargetImages, batchnorm_layers
from transfer_learning.adaptation.registry import METHODS, AdaptationSettings, should_run
from transfer_learning.adaptation.shift import domain_shift
from transfer_learning.adaptation.standardise import with_target_standardisation
from transfer_learning.adaptation.tent import TentSettings, prediction_entropy, tent
from transfer_learning.data.index import index_target_images
from transfer_learning.data.loading import EvalCollate, Normaliser, Preprocessing
from transfer_learning.data.settings import DataSettings, DataSourceError

METHOD = {method.name: method for method in METHODS}

# ---- settings --------------------------------------------------------------------------------


def test_settings_name_the_bad_key_or_value():
    with pytest.raises(AdaptationError, match=r"adaptation\.tent\.learning_rate"):
        AdaptationSettings.from_params({"tent": {"learning_rate": 0.1}})
    with pytest.raises(AdaptationError, match="dann is not a method"):
        AdaptationSettings.from_params({"methods": ["coral", "dann"]})
    with pytest.raises(AdaptationError, match=r"adaptation\.mcc\.steps=0"):
        AdaptationSettings.from_params({"mcc": {"steps": 0}})
    with pytest.raises(AdaptationError, match=r"adaptation\.coral_regularisation is not a setting"):
        AdaptationSettings.from_params({"coral_regularisation": 0.5})
    settings = AdaptationSettings.from_params({"methods": "coral", "tent": {"epochs": 2}})
    assert settings.methods == ("coral",) and settings.of(METHOD["tent"]) == TentSettings(epochs=2)
    assert (
        settings.of(METHOD["coral"]).regularisation == 1.0 and settings.of(METHOD["adabn"]) is None
    )


def test_batchnorm_methods_are_left_out_under_auto_and_refused_when_named(caplog):
    auto = AdaptationSettings.from_params({})
    with caplog.at_level(logging.INFO):
        assert not should_run(METHOD["tent"], auto, has_batchnorm=False)
    assert "no BatchNorm" in caplog.text
    assert should_run(METHOD["mcc"], auto, has_batchnorm=False)
    named = AdaptationSettings.from_params({"methods": ["adabn"]})
    with pytest.raises(AdaptationError, match="adabn, which needs BatchNorm"):
        should_run(METHOD["adabn"], named, has_batchnorm=False)
    assert not should_run(METHOD["coral"], named)


# ---- the shift measure -----------------------------------------------------------------------


def test_domain_shift_is_chance_on_one_distribution_and_large_on_two():
    rng = np.random.default_rng(0)
    source = rng.normal(size=(600, 20))
    same = domain_shift(source, rng.normal(size=(600, 20)), max_images=2000, seed=0)
    assert abs(same["domain_classifier_accuracy"] - 0.5) < 0.07
    assert same["proxy_a_distance"] < 0.3 and same["images_per_domain"] == 600
    moved = domain_shift(source, rng.normal(size=(900, 20)) + 2.0, max_images=500, seed=0)
    assert moved["domain_classifier_accuracy"] > 0.97 and moved["proxy_a_distance"] > 1.85
    assert moved["images_per_domain"] == 500


# ---- feature level ---------------------------------------------------------------------------


def _blobs(rng, n=300, d=6):
    labels = rng.integers(0, 3, size=n)
    centres = rng.normal(scale=3.0, size=(3, d))
    return centres[labels] + rng.normal(size=(n, d)), labels


def test_target_standardisation_undoes_a_per_dimension_rescaling():
    rng = np.random.default_rng(1)
    features, labels = _blobs(rng)
    head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(features, labels)
    scale, shift = rng.uniform(0.2, 5.0, size=6), rng.normal(scale=40, size=6)
    target = features * scale + shift  # the same images seen by another "camera"
    adapted = with_target_standardisation(head, target)
    # The same standardised features by two float64 routes (shift and scale undone): rounding.
    np.testing.assert_allclose(
        adapted.predict_proba(target), head.predict_proba(features), rtol=0, atol=1e-9
    )
    assert (head.predict(target) != labels).mean() > 0.2  # unadapted, the head is lost
    np.testing.assert_array_equal(head[0].mean_, StandardScaler().fit(features).mean_)


def test_coral_gives_source_features_the_target_mean_and_covariance():
    rng = np.random.default_rng(2)
    source = rng.normal(size=(4000, 4)) @ rng.normal(size=(4, 4)) + 1.0
    target = rng.normal(size=(4000, 4)) @ rng.normal(size=(4, 4)) - 3.0
    aligned = CoralTransform.fit(source, target, regularisation=1e-9)(source)
    # float64 throughout: the mean by rounding only; the covariance also by the 1e-9 ridge and
    # the matrix square roots (eigendecompositions).
    np.testing.assert_allclose(aligned.mean(axis=0), target.mean(axis=0), atol=1e-9)
    np.testing.assert_allclose(np.cov(aligned.T), np.cov(target.T), rtol=1e-6, atol=1e-8)


def test_coral_between_samples_of_one_distribution_barely_moves_features():
    rng = np.random.default_rng(3)
    mixing = rng.normal(size=(8, 8))
    source = rng.normal(size=(3000, 8)) @ mixing
    target = rng.normal(size=(3000, 8)) @ mixing
    aligned = CoralTransform.fit(source, target, regularisation=1.0)(source)
    spread = source.std(axis=0)
    assert np.abs((aligned - source) / spread).mean() < 0.05


# ---- network level ---------------------------------------------------------------------------

PREPROCESSING = Preprocessing(image_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def small_network(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(8, 4),
    )


@pytest.fixture
def target_images(tmp_path) -> TargetImages:
    rng = np.random.default_rng(5)
    paths = [str(write_image(tmp_path / f"{i}.png", rng, size=(16, 16))) for i in range(130)]
    return TargetImages(
        paths, EvalCollate(PREPROCESSING), Normaliser(PREPROCESSING), torch.device("cpu")
    )


def normalised(images: TargetImages) -> torch.Tensor:
    return torch.cat([images.normalise(batch) for batch in images.loader(64)])


def test_adabn_statistics_are_the_target_images_statistics(target_images):
    network = small_network()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    adapt_batchnorm(network, target_images, batch_size=64)
    # Oracle: the first layer's outputs on the images adaptation used (two full batches of 64;
    # the last partial batch is left out), computed directly.
    with torch.no_grad():
        conv = network[0](normalised(target_images)[:128])
    # float32, two paths (two batches' means averaged vs one mean over 128): torch.testing's atol.
    np.testing.assert_allclose(network[1].running_mean, conv.mean(dim=(0, 2, 3)), atol=1e-5)
    assert not torch.allclose(network[1].running_mean, before["1.running_mean"])
    for key, value in network.state_dict().items():  # no weight moved
        if "running" not in key and "num_batches" not in key:
            torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert not network.training and network[1].momentum == 0.1


def test_tent_moves_only_normalisation_affine_and_lowers_entropy(target_images):
    network = small_network()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    baseline = adapt_batchnorm(small_network(), target_images)
    tent(network, target_images, TentSettings(epochs=5, batch_size=32, lr=0.05), seed=0)
    affine = {f"{i}.{p}" for i in (1, 4) for p in ("weight", "bias")}
    for key, value in network.state_dict().items():
        if key in affine:
            assert not torch.allclose(value, before[key])
        elif "running" not in key and "num_batches" not in key:
            torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    images = normalised(target_images)
    with torch.no_grad():
        assert prediction_entropy(network(images)) < prediction_entropy(baseline(images)) - 0.05
    assert all(p.requires_grad for p in network.parameters()) and not network.training
    assert len(batchnorm_layers(network)) == 2


def test_mcc_loss_against_hand_computed_values():
    classes = 4
    uniform = torch.zeros(8, classes)
    # Every row of the row-normalised confusion is uniform: off-diagonal mass (C-1)/C per row.
    # The loss runs in float32 (float32 logits): torch.testing's float32 tolerance.
    off_diagonal = (classes - 1) / classes
    assert mcc_loss(uniform, 2.5).item() == pytest.approx(off_diagonal, rel=1.3e-6, abs=1e-5)
    confident = torch.eye(classes).repeat(2, 1) * 100.0  # each sample sure of its own class
    # Off-diagonal mass ~1e-17; the sum minus the trace of float32 entries near 1 cancels to ~1e-7.
    assert mcc_loss(confident, temperature=2.5).item() == pytest.approx(0.0, abs=1e-6)
    mixed = torch.randn(16, classes, generator=torch.Generator().manual_seed(0))
    shuffled = mixed[torch.randperm(16, generator=torch.Generator().manual_seed(1))]
    # Two paths: the float32 sums over the samples run in another order.
    assert mcc_loss(mixed, 2.5).item() == pytest.approx(
        mcc_loss(shuffled, 2.5).item(), rel=1.3e-6, abs=1e-5
    )


def test_mcc_loss_two_samples_by_hand():
    # Probabilities after temperature: rows (0.9, 0.1) and (0.2, 0.8).
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8]])
    temperature = 2.0
    logits = torch.tensor(np.log(probabilities) * temperature)
    entropy = -(probabilities * np.log(probabilities + 1e-5)).sum(axis=1)
    weight = 1 + np.exp(-entropy)
    weight = 2 * weight / weight.sum()
    confusion = np.zeros((2, 2))
    for sample in range(2):
        confusion += weight[sample] * np.outer(probabilities[sample], probabilities[sample])
    confusion /= confusion.sum(axis=1, keepdims=True)
    expected = (confusion.sum() - np.trace(confusion)) / 2
    # float64 logits: the loss runs in float64, a few roundings from the formula here.
    assert mcc_loss(logits, temperature).item() == pytest.approx(expected, rel=1e-6)


# ---- target images ---------------------------------------------------------------------------


def target_settings(path) -> DataSettings:
    return DataSettings(source="imagefolder", path="unused", target_path=str(path))


def test_labelled_target_maps_labels_by_class_name_and_holds_out_a_stratified_test(
    make_image_folder,
):
    # The target has two of the three source classes, in another alphabetical position.
    folder = make_image_folder({"dog": 8, "cat": 6})
    index, skipped = index_target_images(target_settings(folder), ["ant", "cat", "dog"], seed=0)
    assert skipped.empty and set(index["split"]) == {"adapt", "test"}
    assert dict(zip(index["class_name"], index["label"], strict=True)) == {"cat": 1, "dog": 2}
    test = index[index["split"] == "test"]
    assert test["class_name"].value_counts().to_dict() == {"dog": 4, "cat": 3}
    again, _ = index_target_images(target_settings(folder), ["ant", "cat", "dog"], seed=0)
    pd.testing.assert_frame_equal(index, again)


def test_target_test_folder_is_the_test_split(make_image_folder):
    folder = make_image_folder({"cat": 3, "dog": 3}, splits=("train", "test"))
    index, _ = index_target_images(target_settings(folder), ["cat", "dog"], seed=0)
    assert (index["split"] == "test").sum() == 6
    assert index.loc[index["split"] == "test", "location"].str.contains("/test/").all()
    assert index.loc[index["split"] == "adapt", "location"].str.contains("/train/").all()


def test_unlabelled_target_takes_every_image_at_any_depth(tmp_path, caplog):
    rng = np.random.default_rng(0)
    for path in ("site_b/2024/a.png", "site_b/2025/june/b.jpg", "cat/c.png", "d.png"):
        write_image(tmp_path / "target" / path, rng)
    with caplog.at_level(logging.WARNING):
        index, _ = index_target_images(target_settings(tmp_path / "target"), ["cat", "dog"], 0)
    assert len(index) == 4 and (index["split"] == "adapt").all() and (index["label"] == -1).all()
    assert "site_b are not source classes" in caplog.text


def test_bad_target_path_names_the_parameter(tmp_path):
    with pytest.raises(DataSourceError, match="needs data.target_path"):
        index_target_images(DataSettings(), ["a", "b"], 0)
    with pytest.raises(DataSourceError, match=r"data.target_path='.*nowhere' is not a folder"):
        index_target_images(target_settings(tmp_path / "nowhere"), ["a", "b"], 0)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataSourceError, match="holds no images"):
        index_target_images(target_settings(tmp_path / "empty"), ["a", "b"], 0)
    with pytest.raises(DataSourceError, match="target_test_fraction"):
        DataSettings.from_params({"target_test_fraction": 1.5})
