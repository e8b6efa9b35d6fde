"""The deployable image model: one code path for test scoring, predict and MLflow serving."""

from __future__ import annotations

import base64
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from torchvision.transforms import v2

from transfer_learning.models.backbones import BackboneSettings, build_backbone
from transfer_learning.models.classifier import build_classifier
from transfer_learning.serving.classifier import (
    ALLOW_PATHS_VARIABLE,
    ERRORS,
    MAX_BYTES_VARIABLE,
    MAX_PIXELS_VARIABLE,
    ImageClassifier,
    probability_matrix,
)

CLASSES = ["china", "flower", "other"]
SIZE = 64


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[str]:
    """scikit-learn's two real photos as a JPEG and a PNG, plus a smaller crop of each."""
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for i, pixels in enumerate(load_sample_images().images):
        image = Image.fromarray(pixels)
        for suffix, picture in ((".jpg", image), (".png", image.crop((40, 30, 240, 180)))):
            path = folder / f"{i}{suffix}"
            picture.save(path)
            paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def fine_tuned() -> ImageClassifier:
    settings = BackboneSettings(image_size=SIZE)
    model, _ = build_classifier(settings, len(CLASSES), seed=1)
    return ImageClassifier("parameter_transfer", CLASSES, settings.name, SIZE, model.state_dict())


def reference_probabilities(model: ImageClassifier, paths: list[str]) -> np.ndarray:
    """A second implementation: torchvision's own transforms, one image at a time, numpy softmax."""
    settings = BackboneSettings(image_size=SIZE, pretrained=False)
    network, backbone = build_classifier(settings, len(CLASSES), seed=0)
    network.load_state_dict(model.network_state)
    p = backbone.preprocessing
    transform = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(SIZE, interpolation=v2.InterpolationMode(p.interpolation), antialias=True),
            v2.CenterCrop(SIZE),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(p.mean, p.std),
        ]
    )
    rows = []
    with torch.inference_mode():
        for path in paths:
            with Image.open(path) as image:
                logits = network.eval()(transform(image.convert("RGB"))[None]).double().numpy()[0]
            exp = np.exp(logits - logits.max())
            rows.append(exp / exp.sum())
    return np.array(rows)


def test_probabilities_match_an_independent_preprocessing(fine_tuned, photos):
    predicted = fine_tuned.predict_files(photos)
    probabilities = probability_matrix(predicted)
    # A float64 softmax: its rows miss 1 by a few ulps.
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-12)
    # Other pixels, not only other rounding: the model decodes large JPEGs at reduced scale and
    # resizes in batches; the reference decodes at full size, one image at a time.
    np.testing.assert_allclose(
        probabilities, reference_probabilities(fine_tuned, photos), atol=2e-3
    )
    assert list(predicted.columns) == [
        "predicted_class",
        *[f"probability_{c}" for c in CLASSES],
        "error",
        "error_message",
    ]
    assert predicted["predicted_class"].tolist() == [CLASSES[i] for i in probabilities.argmax(1)]


def test_paths_and_base64_bytes_give_the_same_answer(fine_tuned, photos):
    by_path = fine_tuned.predict_files(photos)
    by_bytes = fine_tuned.predict(pd.DataFrame({"image": [encoded(path) for path in photos]}))
    pd.testing.assert_frame_equal(by_path, by_bytes)


def encoded(path: str) -> str:
    with open(path, "rb") as stream:
        return base64.b64encode(stream.read()).decode()


def test_unreadable_files_are_reported_and_the_rest_scored(fine_tuned, photos, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    predicted = fine_tuned.predict_files([photos[0], str(broken), photos[1]])
    assert predicted["error"].tolist() == ["", "unreadable_file", ""]
    assert predicted["error_message"][1] == ERRORS["unreadable_file"]
    assert (
        predicted["predicted_class"][1] == "" and np.isnan(probability_matrix(predicted)[1]).all()
    )
    alone = fine_tuned.predict_files([photos[0], photos[1]])
    # The same two images in one batch through the same network: bit for bit.
    np.testing.assert_array_equal(probability_matrix(predicted)[[0, 2]], probability_matrix(alone))


def test_each_bad_row_gets_its_code_and_the_good_rows_their_answer(fine_tuned, photos, tmp_path):
    big = tmp_path / "big.png"
    Image.new("RGB", (5000, 5000), "white").save(big)
    rows = pd.DataFrame(
        {
            "image": [
                encoded(photos[0]),
                "this is not base64!",
                base64.b64encode(b"plain text, not an image").decode(),
                encoded(str(big)),
                None,
                None,
            ],
            "path": [None, None, None, None, "/etc/passwd", None],
        }
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(MAX_PIXELS_VARIABLE, str(4000 * 4000))
        predicted = fine_tuned.predict(rows)
    assert predicted["error"].tolist() == [
        "",
        "bad_base64",
        "not_an_image",
        "too_large",
        "path_not_allowed",
        "missing_input",
    ]
    good = fine_tuned.predict_files([photos[0]])
    # The same decoded image, alone in its batch, through the same network: bit for bit.
    np.testing.assert_array_equal(probability_matrix(predicted)[:1], probability_matrix(good))
    # Failed rows carry None (JSON null), never NaN; no message repeats a path or a repr.
    assert (
        predicted.iloc[1:][[c for c in predicted if c.startswith("probability_")]]
        .isna()
        .all()
        .all()
    )
    assert all(v is None for v in predicted.iloc[1:]["probability_china"])
    assert not any("/" in m or "<" in m or "Error" in m for m in predicted["error_message"])


def test_server_side_paths_only_when_the_deployer_allows_them(fine_tuned, photos, monkeypatch):
    rows = pd.DataFrame({"path": [photos[0]]})
    assert fine_tuned.predict(rows)["error"][0] == "path_not_allowed"
    monkeypatch.setenv(ALLOW_PATHS_VARIABLE, "true")
    assert fine_tuned.predict(rows)["error"][0] == ""
    monkeypatch.setenv(MAX_BYTES_VARIABLE, "ten")
    with pytest.raises(ValueError, match=MAX_BYTES_VARIABLE):
        fine_tuned.predict(rows)


def test_a_byte_limit_refuses_before_decoding(fine_tuned, photos, monkeypatch):
    monkeypatch.setenv(MAX_BYTES_VARIABLE, "1000")
    predicted = fine_tuned.predict(pd.DataFrame({"image": [encoded(photos[0])]}))
    assert predicted["error"][0] == "too_large"


def test_batches_do_not_change_the_answer(fine_tuned, photos):
    whole = probability_matrix(fine_tuned.predict_files(photos))
    small = ImageClassifier(
        "parameter_transfer",
        CLASSES,
        "efficientnet_lite0",
        SIZE,
        fine_tuned.network_state,
        batch_size=1,
    )
    # Batches of 1 and of 4 run other float32 kernels (blocking, threads): torch.testing's
    # float32 tolerance, not bit equality.
    np.testing.assert_allclose(
        probability_matrix(small.predict_files(photos)), whole, rtol=1.3e-6, atol=1e-5
    )


def test_a_pickled_model_predicts_alike_and_carries_no_built_network(fine_tuned, photos):
    expected = fine_tuned.predict_files(photos)  # builds the network
    state = pickle.dumps(fine_tuned)
    restored = pickle.loads(state)
    assert (
        restored._network is None
        and len(state)
        < 1.2 * sum(t.numel() * t.element_size() for t in fine_tuned.network_state.values()) + 10**6
    )
    pd.testing.assert_frame_equal(restored.predict_files(photos), expected)


def test_a_scikit_learn_head_on_features(photos):
    from sklearn.linear_model import LogisticRegression

    backbone = build_backbone(BackboneSettings(image_size=SIZE))
    rng = np.random.default_rng(0)
    # Class 2 is absent from the head's training labels: its column must be 0, not shifted.
    head = LogisticRegression().fit(rng.normal(size=(20, 1280)), np.arange(20) % 2)
    model = ImageClassifier(
        "feature_transfer",
        CLASSES,
        "efficientnet_lite0",
        SIZE,
        backbone.features.state_dict(),
        head,
    )
    probabilities = probability_matrix(model.predict_files(photos))
    assert (probabilities[:, 2] == 0).all()
    # Rows renormalised in float64 (align_probabilities): they miss 1 by a few ulps.
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-12)
