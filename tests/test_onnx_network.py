"""ONNX Runtime as the engine of frozen forward passes: same outputs as PyTorch, cached exports
reused and rebuilt when they go bad, and PyTorch wherever the exporter cannot follow."""

import base64
import io
import logging
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from torch import nn

from tests.conftest import write_image
from transfer_learning.data.loading import EvalCollate, Normaliser
from transfer_learning.features.extraction import (
    ExtractionError,
    ExtractionSettings,
    extract_features,
)
from transfer_learning.models.backbones import BackboneSettings, build_backbone
from transfer_learning.models.classifier import build_classifier
from transfer_learning.models.onnx_network import (
    ONNXRUNTIME,
    RELATIVE_TOLERANCE,
    TORCH,
    EngineError,
    onnx_forward,
    resolve_engine,
)
from transfer_learning.serving.classifier import (
    ENGINE_VARIABLE,
    ImageClassifier,
    probability_matrix,
)
from transfer_learning.serving.packaging import (
    load_image_model,
    local_image_classifier,
    save_image_model,
)

CPU = torch.device("cpu")


def photo_batch(image_size: int) -> torch.Tensor:
    """scikit-learn's two bundled photos (a temple, a flower), as extraction collates them."""
    photos = [torch.from_numpy(p.copy()).permute(2, 0, 1) for p in load_sample_images().images]
    return EvalCollate(build_backbone(BackboneSettings(image_size=image_size)).preprocessing)(
        photos
    )


def feature_network(backbone) -> nn.Module:
    return nn.Sequential(Normaliser(backbone.preprocessing), backbone.features).eval()


def relative_difference(actual, expected) -> float:
    """How far apart two engines' float32 outputs are, relative to the largest: the engines'
    kernels sum in other orders, so they agree to RELATIVE_TOLERANCE, never bit for bit."""
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"],
)
def test_each_bundled_backbone_exports_with_pytorchs_features_on_real_photos(name, tmp_path):
    backbone = build_backbone(BackboneSettings(name=name, image_size=None))
    size = backbone.preprocessing.image_size
    network = feature_network(backbone)
    forward = onnx_forward(network, size, tmp_path, name)
    assert forward is not None
    photos = EvalCollate(backbone.preprocessing)(
        [torch.from_numpy(p.copy()).permute(2, 0, 1) for p in load_sample_images().images]
    )
    with torch.inference_mode():
        expected = network(photos).numpy()
    actual = forward(photos)
    assert actual.shape == expected.shape == (2, backbone.feature_dim)
    assert relative_difference(actual, expected) <= RELATIVE_TOLERANCE
    # Same features, same prediction: the ImageNet classes the real weights give both photos.
    classify = backbone.classifier.eval()
    with torch.inference_mode():
        torch_classes = classify(torch.from_numpy(expected)).argmax(1)
        onnx_classes = classify(torch.from_numpy(actual)).argmax(1)
    assert torch.equal(torch_classes, onnx_classes)


@pytest.fixture(scope="module")
def small():
    """Lite0 at 64 px: a real network, cheap to export."""
    return build_backbone(BackboneSettings(image_size=64))


@pytest.mark.slow  # exports a network two or three times
def test_a_cached_export_is_reused_and_rebuilt_when_corrupted(small, tmp_path, caplog):
    network = feature_network(small)
    assert onnx_forward(network, 64, tmp_path, small.name) is not None
    (export,) = tmp_path.glob("*.onnx")
    first_bytes = export.read_bytes()
    stamp = export.stat().st_mtime_ns
    assert onnx_forward(network, 64, tmp_path, small.name) is not None
    assert export.stat().st_mtime_ns == stamp  # reused, not exported again

    export.write_bytes(first_bytes[: len(first_bytes) // 2])  # a run killed mid-copy, a bad disk
    with caplog.at_level(logging.WARNING):
        forward = onnx_forward(network, 64, tmp_path, small.name)
    assert "does not load or match" in caplog.text and str(export) in caplog.text
    assert export.stat().st_size > len(first_bytes) // 2  # exported whole again
    batch = photo_batch(64)
    with torch.inference_mode():
        expected = network(batch).numpy()
    assert relative_difference(forward(batch), expected) <= RELATIVE_TOLERANCE


@pytest.mark.slow  # exports a network two or three times
def test_a_cached_export_of_other_weights_is_detected_and_rebuilt(small, tmp_path, caplog):
    network = feature_network(small)
    other = feature_network(build_backbone(BackboneSettings(image_size=64, pretrained=False)))
    assert onnx_forward(other, 64, tmp_path, "other") is not None
    (foreign,) = tmp_path.glob("*.onnx")
    assert onnx_forward(network, 64, tmp_path, small.name) is not None
    (own,) = set(tmp_path.glob("*.onnx")) - {foreign}
    own.write_bytes(foreign.read_bytes())  # a valid model, the wrong weights

    with caplog.at_level(logging.WARNING):
        forward = onnx_forward(network, 64, tmp_path, small.name)
    assert "does not load or match" in caplog.text
    batch = photo_batch(64)
    with torch.inference_mode():
        expected = network(batch).numpy()
    assert relative_difference(forward(batch), expected) <= RELATIVE_TOLERANCE


class _Unexportable(nn.Module):
    """Features through a running maximum: ONNX opset 18 has no `cummax`, the exporter refuses."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.cummax(self.inner(x), dim=1).values


def test_what_the_exporter_cannot_handle_runs_in_pytorch(tmp_path, caplog):
    backbone = build_backbone(BackboneSettings(image_size=32))
    backbone.features = _Unexportable(backbone.features)
    with caplog.at_level(logging.WARNING):
        assert onnx_forward(feature_network(backbone), 32, tmp_path, "opaque_net") is None
    (line,) = [r.getMessage() for r in caplog.records if "opaque_net" in r.getMessage()]
    assert "runs in PyTorch instead" in line

    images = [str(write_image(tmp_path / "a.png", np.random.default_rng(0), size=(40, 30)))]
    settings = ExtractionSettings(
        cache_dir=str(tmp_path / "cache"), progress=False, engine="onnxruntime"
    )
    result = extract_features(backbone, images, settings, CPU)
    assert result.engine == TORCH  # fell back, and keyed as PyTorch's features
    torch_only = extract_features(
        backbone, images, ExtractionSettings(engine="torch", progress=False, cache_dir=None), CPU
    )
    np.testing.assert_array_equal(result.features, torch_only.features)


def test_extraction_by_onnx_runtime_equals_pytorch_and_is_cached_apart(small, tmp_path):
    rng = np.random.default_rng(1)
    files = [str(write_image(tmp_path / f"{i}.png", rng, size=(48, 40))) for i in range(5)]
    cache = str(tmp_path / "cache")
    onnx = ExtractionSettings(batch_size=2, cache_dir=cache, progress=False, engine="onnxruntime")
    by_onnx = extract_features(small, files, onnx, CPU)
    by_torch = extract_features(
        small,
        files,
        ExtractionSettings(batch_size=2, cache_dir=cache, progress=False, engine="torch"),
        CPU,
    )
    assert (by_onnx.engine, by_torch.engine) == (ONNXRUNTIME, TORCH)
    assert by_onnx.cache_key != by_torch.cache_key and not by_torch.cached
    assert relative_difference(by_onnx.features, by_torch.features) <= RELATIVE_TOLERANCE
    again = extract_features(small, files, onnx, CPU)
    assert again.cached and again.engine == ONNXRUNTIME
    np.testing.assert_array_equal(again.features, by_onnx.features)


def test_engine_choices(monkeypatch):
    assert resolve_engine("auto", CPU) == ONNXRUNTIME  # a server: work without end
    assert resolve_engine("auto", CPU, pixels=2_000 * 224**2) == ONNXRUNTIME  # photos
    assert resolve_engine("auto", CPU, pixels=1_797 * 32**2) == TORCH  # the digits: not worth it
    assert resolve_engine("onnxruntime", CPU, pixels=1) == ONNXRUNTIME  # asked for
    assert resolve_engine("torch", CPU) == TORCH
    assert resolve_engine("auto", torch.device("cuda")) == TORCH
    with pytest.raises(EngineError, match="extraction.engine=onnxruntime runs on the CPU"):
        resolve_engine("onnxruntime", torch.device("cuda"))
    with pytest.raises(ExtractionError, match="extraction.engine='tensorrt'"):
        ExtractionSettings.from_params({"engine": "tensorrt"})

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    assert resolve_engine("auto", CPU) == TORCH
    with pytest.raises(EngineError, match="pip install onnxruntime"):
        resolve_engine("onnxruntime", CPU)


# ---- the packaged model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """A fine-tuned-shaped Lite0 classifier at 64 px, packaged as the pipelines package it."""
    settings = BackboneSettings(image_size=64)
    network, _ = build_classifier(settings, 3, seed=1)
    model = ImageClassifier(
        "parameter_transfer", ["a", "b", "c"], settings.name, 64, network.state_dict()
    )
    folder = tmp_path_factory.mktemp("packaged") / "model"
    save_image_model(model, folder)
    return folder


def served_answer(folder) -> tuple[str, np.ndarray]:
    """A fresh load of the packaged model: its engine, and its probabilities for the photos
    sent as a network client sends them."""
    model = local_image_classifier(load_image_model(folder))
    rows = pd.DataFrame({"image": [photo_base64(p) for p in load_sample_images().images]})
    answer = model.predict(rows)
    assert (answer["error"] == "").all()
    return model.engine, probability_matrix(answer)


def photo_base64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@pytest.mark.slow  # exports a network two or three times
def test_the_packaged_model_runs_its_checked_onnx_export_with_pytorchs_answers(
    packaged, monkeypatch
):
    assert len(list(packaged.rglob("model.onnx"))) == 1
    engine, by_onnx = served_answer(packaged)
    monkeypatch.setenv(ENGINE_VARIABLE, "torch")
    torch_engine, by_torch = served_answer(packaged)
    assert (engine, torch_engine) == (ONNXRUNTIME, TORCH)
    # Logits RELATIVE_TOLERANCE apart move a softmax probability by about that share of itself
    # (small logits here); atol for the probabilities near 0. The same below.
    np.testing.assert_allclose(by_onnx, by_torch, rtol=RELATIVE_TOLERANCE, atol=1e-6)


@pytest.mark.slow  # exports a network two or three times
def test_a_changed_packaged_export_is_refused_and_left_as_it_is(packaged, tmp_path, caplog):
    copy = tmp_path / "model"
    shutil.copytree(packaged, copy)
    (export,) = copy.rglob("model.onnx")
    export.write_bytes(export.read_bytes()[:100_000])
    with caplog.at_level(logging.WARNING):
        engine, answer = served_answer(copy)
    assert engine == TORCH and str(export) in caplog.text
    assert export.stat().st_size == 100_000  # a model folder is never rewritten
    _, expected = served_answer(packaged)
    np.testing.assert_allclose(answer, expected, rtol=RELATIVE_TOLERANCE, atol=1e-6)


@pytest.mark.slow  # exports a network two or three times
def test_without_onnx_runtime_models_are_packaged_and_served_by_pytorch(
    packaged, tmp_path, monkeypatch
):
    _, with_onnx = served_answer(packaged)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    settings = BackboneSettings(image_size=64)
    network, _ = build_classifier(settings, 3, seed=1)
    model = ImageClassifier(
        "parameter_transfer", ["a", "b", "c"], settings.name, 64, network.state_dict()
    )
    save_image_model(model, tmp_path / "model")
    assert not list((tmp_path / "model").rglob("model.onnx"))
    engine, answer = served_answer(tmp_path / "model")
    assert engine == TORCH
    np.testing.assert_allclose(answer, with_onnx, rtol=RELATIVE_TOLERANCE, atol=1e-6)
    # A model packaged with ONNX Runtime still loads and predicts where it is missing.
    engine, answer = served_answer(packaged)
    assert engine == TORCH
    np.testing.assert_allclose(answer, with_onnx, rtol=RELATIVE_TOLERANCE, atol=1e-6)
