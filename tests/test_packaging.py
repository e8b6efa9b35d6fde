"""The packaged model and the stored head load without running code: tampered files are refused."""

from __future__ import annotations

import base64
import builtins
import json
import os
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import skops.io
import torch
from kedro.io import DatasetError, Version
from mlflow.models import get_model_info
from PIL import Image
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.datasets import load_sample_images, make_classification

from transfer_learning.kedro_io.datasets import (
    ChampionModelDataset,
    HeadDataset,
    ImageModelDataset,
    OtherSeedsDataset,
    RegisteredImageModelDataset,
)
from transfer_learning.models.backbones import BackboneSettings, build_backbone
from transfer_learning.models.classifier import build_classifier
from transfer_learning.models.heads import HeadSettings, select_and_fit
from transfer_learning.models.onnx_network import RELATIVE_TOLERANCE
from transfer_learning.serving.classifier import ImageClassifier
from transfer_learning.serving.packaging import ModelFileError, head_bytes, local_image_classifier

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
        "model.onnx",  # the network for ONNX Runtime (installed here)
        "network.pt",
    ]
    expected = head_model.predict_files(photos)
    # The loaded model runs its model.onnx (ONNX Runtime), the in-memory one PyTorch: the export
    # is checked equal to RELATIVE_TOLERANCE, not bit for bit.
    np.testing.assert_allclose(
        loaded.unwrap_python_model().predict_files(photos).filter(like="probability_"),
        expected.filter(like="probability_"),
        rtol=0,
        atol=RELATIVE_TOLERANCE,
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


@pytest.mark.slow  # over 7 s alone: `make test` runs it, `make test-fast` does not
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


# Loads a packaged model in a fresh process, as a server would, predicts, and lists the files of
# the project's modules that this imported.
SERVED_PROJECT_MODULES = """
import base64, json, sys
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
image = base64.b64encode(open(sys.argv[2], "rb").read()).decode()
assert model.predict(pd.DataFrame({"image": [image]}))["error"].tolist() == [""]
print(json.dumps(sorted(m.__file__ for n, m in list(sys.modules.items())
                        if n.split(".")[0] == "transfer_learning" and getattr(m, "__file__", None))))
"""


def installed_closure(requirements: list[str]) -> set[str]:
    """The distributions `requirements` install: each one and, recursively, what it requires."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found: set[str] = set()
    pending = [Requirement(line).name for line in requirements]
    while pending:
        name = canonicalize_name(pending.pop())
        if name in found:
            continue
        found.add(name)
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return found


def imported_packages(source_files: list[str]) -> set[str]:
    """The top-level third-party packages these files import (anywhere in them, not only at
    the top: a function-level import runs when that function does)."""
    import ast
    import sys

    names = set()
    for file in source_files:
        for node in ast.walk(ast.parse(Path(file).read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"__future__", "transfer_learning"}


@pytest.mark.slow  # over 7 s alone: `make test` runs it, `make test-fast` does not
def test_a_saved_model_states_pinned_requirements_that_cover_what_it_imports(
    head_model, photos, tmp_path
):
    """MLflow is given the requirements (it infers none in a subprocess), and they are enough:
    every package that the project's modules a served model loads import is installed by them."""
    import subprocess
    import sys
    from importlib import metadata

    from packaging.utils import canonicalize_name

    _, files = saved(head_model, tmp_path)
    stated = (files / "image_model" / "requirements.txt").read_text().split()
    assert f"torch=={metadata.version('torch')}" in stated
    assert f"scikit-learn=={metadata.version('scikit-learn')}" in stated
    assert not any(line.startswith(("kedro-viz", "kedro-mlflow")) for line in stated)
    completed = subprocess.run(
        [sys.executable, "-c", SERVED_PROJECT_MODULES, str(files / "image_model"), photos[1]],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    loaded = json.loads(completed.stdout.splitlines()[-1])
    assert any(file.endswith("serving/classifier.py") for file in loaded)
    owners = metadata.packages_distributions()
    installed = installed_closure(stated)
    for package in imported_packages(loaded):
        distributions = {canonicalize_name(d) for d in owners.get(package, [])}
        assert distributions & installed, f"{package} is imported when serving, not required"


def test_a_calibrated_combination_round_trips_and_predicts_the_weighted_tempered_mixture(
    head_model, photos, tmp_path
):
    """Two members at their own temperatures, weighted, then a temperature of the whole: what
    is saved loads as the same model, and predicts the mixture computed here by hand."""
    from scipy.special import softmax

    from transfer_learning.serving.classifier import CombinedClassifier

    network, _ = build_classifier(BackboneSettings(image_size=48, pretrained=False), 2, seed=1)
    network_model = ImageClassifier(
        "parameter_transfer", CLASSES, "efficientnet_lite0", 48, network.state_dict()
    )
    members = [head_model.calibrated({"class": 2.0}), network_model.calibrated({"class": 0.5})]
    combined = CombinedClassifier("ensemble", members, [1.0, 3.0]).calibrated({"class": 1.5})
    assert combined.weights == [0.25, 0.75] and combined.image_size == 48

    dataset, files = saved(combined, tmp_path)
    artifacts = sorted(p.name for p in (files / "image_model" / "artifacts").iterdir())
    assert artifacts == [
        "member0_head.skops",
        "member0_model.json",
        "member0_model.onnx",
        "member0_network.pt",
        "member1_model.json",
        "member1_model.onnx",
        "member1_network.pt",
        "model.json",
    ]
    loaded = local_image_classifier(dataset.load())
    assert isinstance(loaded, CombinedClassifier) and loaded.temperatures == {"class": 1.5}
    assert [m.temperatures for m in loaded.members] == [{"class": 2.0}, {"class": 0.5}]

    def tempered(probabilities, temperature):
        return softmax(np.log(probabilities) / temperature, axis=1)

    raw = [
        head_model.predict_files(photos).filter(like="probability_").to_numpy(float),
        network_model.predict_files(photos).filter(like="probability_").to_numpy(float),
    ]
    expected = tempered(0.25 * tempered(raw[0], 2.0) + 0.75 * tempered(raw[1], 0.5), 1.5)
    got = loaded.predict_files(photos).filter(like="probability_").to_numpy(float)
    # The loaded members run their model.onnx (ONNX Runtime), `raw` came from PyTorch: the
    # exports are checked equal to RELATIVE_TOLERANCE, not bit for bit.
    np.testing.assert_allclose(got, expected, rtol=0, atol=RELATIVE_TOLERANCE)

    # A member's weights replaced by a pickle are refused like a single model's.
    (files / "image_model" / "artifacts" / "member1_network.pt").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(DatasetError, match="member1_network.pt is not a plain weights file"):
        dataset.load()


def test_the_other_seeds_models_round_trip_under_one_version(head_model, photos, tmp_path):
    """`evaluation.seeds`: the other seeds' models, saved as image models are, listed last."""
    second = head_model.calibrated({"class": 2.0})
    held_out = {"label": np.array([0, 1]), "probabilities": np.array([[0.8, 0.2], [0.3, 0.7]])}
    others = [
        {
            "seed": 43,
            "image_model": head_model,
            "held_out_predictions": held_out,
            "fit_seconds": 1.5,
        },
        {"seed": 44, "image_model": second, "held_out_predictions": held_out, "fit_seconds": 2.5},
    ]
    dataset = OtherSeedsDataset(
        str(tmp_path / "other_seeds.json"), str(tmp_path / "other_seeds"), Version(None, "v1")
    )
    dataset.save(others)
    assert not list((tmp_path / "other_seeds").rglob("*.pkl"))
    loaded = OtherSeedsDataset(
        str(tmp_path / "other_seeds.json"), str(tmp_path / "other_seeds"), LATEST
    ).load()
    assert [(o["seed"], o["fit_seconds"]) for o in loaded] == [(43, 1.5), (44, 2.5)]
    np.testing.assert_array_equal(loaded[1]["held_out_predictions"]["label"], [0, 1])
    for original, back in zip(others, loaded, strict=True):
        model = local_image_classifier(back["image_model"])
        assert model.temperatures == original["image_model"].temperatures
        # Loaded: ONNX Runtime (its model.onnx); the original: PyTorch. Checked to
        # RELATIVE_TOLERANCE, not bit for bit.
        np.testing.assert_allclose(
            model.predict_files(photos).filter(like="probability_"),
            original["image_model"].predict_files(photos).filter(like="probability_"),
            rtol=0,
            atol=RELATIVE_TOLERANCE,
        )
    # One seed: an empty list, and no model.
    OtherSeedsDataset(str(tmp_path / "one.json"), str(tmp_path / "one"), Version(None, "v1")).save(
        []
    )
    assert not (tmp_path / "one").exists()
    assert OtherSeedsDataset(str(tmp_path / "one.json"), str(tmp_path / "one"), LATEST).load() == []


@pytest.mark.slow  # ~25 s: two models logged and validated by MLflow, one loaded from the registry
def test_registered_versions_carry_a_signature_and_the_champion_alias_serves(
    head_model, photos, tmp_path
):
    """Two strategies registered in one run, then the comparison's choice: every version has a
    signature, an input example, tags and its test figures; `models:/transfer_learning@champion`
    loads as the chosen strategy's model and predicts on a base64 photo."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    network, _ = build_classifier(BackboneSettings(image_size=32, pretrained=False), 2, seed=1)
    other = ImageClassifier(
        "parameter_transfer", CLASSES, "efficientnet_lite0", 32, network.state_dict()
    )
    figures = {"accuracy": 0.9, "accuracy_interval": [0.8, 0.95], "n_test": 40, "ece": 0.02}
    try:
        experiment = mlflow.create_experiment(
            "packaging", artifact_location=str(tmp_path / "artifacts")
        )
        with mlflow.start_run(experiment_id=experiment):
            mlflow.set_tag("data.name", "photos")
            for model in (head_model, other):
                RegisteredImageModelDataset(
                    f"{model.strategy}_image_model", f"transfer_learning_{model.strategy}"
                ).save(model)
            ChampionModelDataset("transfer_learning", "transfer_learning_{strategy}").save(
                {
                    "strategy": "feature_transfer",
                    "reason": "cheapest, not significantly less accurate",
                    "strategies": {"feature_transfer": figures, "parameter_transfer": figures},
                }
            )
        client = mlflow.MlflowClient()
        version = client.get_model_version("transfer_learning_parameter_transfer", "1")
        assert version.tags == {
            "strategy": "parameter_transfer",
            "backbone": "efficientnet_lite0",
            "image_size": "32",
        }
        assert version.description == (
            "parameter_transfer on photos: test accuracy 90.0 % [80.0, 95.0] on 40 images, "
            "ECE 0.020."
        )
        champion = client.get_model_version_by_alias("transfer_learning", "champion")
        assert champion.tags["strategy"] == "feature_transfer"
        info = get_model_info("models:/transfer_learning@champion")
        assert info.signature.inputs.input_names() == ["image", "path"]
        assert info.signature.outputs.input_names() == [
            "predicted_class",
            *(f"probability_{name}" for name in CLASSES),
            "error",
            "error_message",
        ]
        assert info.saved_input_example_info is not None
        served = mlflow.pyfunc.load_model("models:/transfer_learning@champion")
        image = base64.b64encode(Path(photos[1]).read_bytes()).decode()
        predicted = served.predict(pd.DataFrame({"image": [image]}))
        expected = head_model.predict_files([photos[1]])
        # The registered model runs its model.onnx (ONNX Runtime), head_model PyTorch: the
        # export is checked equal to RELATIVE_TOLERANCE, not bit for bit.
        np.testing.assert_allclose(
            predicted[[f"probability_{c}" for c in CLASSES]].to_numpy(float),
            expected[[f"probability_{c}" for c in CLASSES]].to_numpy(float),
            rtol=0,
            atol=RELATIVE_TOLERANCE,
        )
    finally:
        mlflow.set_tracking_uri(None)
