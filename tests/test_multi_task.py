"""Several label columns at once: one index, one network or feature set, one model for all tasks."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from PIL import Image
from sklearn.datasets import load_digits

from transfer_learning.core.tasks import MISSING, Tasks, task_label_column
from transfer_learning.data.index import build_task_index
from transfer_learning.data.settings import DataSettings, DataSourceError
from transfer_learning.models.backbones import BackboneSettings
from transfer_learning.models.onnx_network import RELATIVE_TOLERANCE
from transfer_learning.pipelines.data_ingestion.nodes import index_images
from transfer_learning.pipelines.evaluation import evaluation_for
from transfer_learning.pipelines.feature_extraction.nodes import extract_image_features
from transfer_learning.pipelines.feature_transfer import create_pipeline as feature_transfer
from transfer_learning.pipelines.learning_curve.nodes import draw_curve_subsets
from transfer_learning.pipelines.templates.network_training import network_training_pipeline
from transfer_learning.serving.packaging import load_image_model, save_image_model
from transfer_learning.training.losses import MultiTaskLoss, training_criterion, training_loss
from transfer_learning.training.recipe import (
    FinetuneSettings,
    Recipe,
    TrainingError,
    TrainingRunSettings,
    TrainValImages,
)
from transfer_learning.training.trainer import train_classifier

N_IMAGES = 400
RECIPE = {"epochs": 6, "batch_size": 16, "hflip": False, "patience": None}


def write_digits_manifest(folder: Path, n_images: int = N_IMAGES) -> pd.DataFrame:
    """The first `n_images` bundled digits as PNG files in `folder` and `labels.csv` beside them
    with two tasks: the digit and its parity. Rows 10, 20, ... lack the digit, rows 15, 35, ...
    the parity, rows 5 and 7 both."""
    digits = load_digits()
    rows = []
    for i in range(n_images):
        pixels = (digits.images[i] * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")
        target = int(digits.target[i])
        rows.append(
            {
                "path": f"{i:04d}.png",
                "digit": str(target),
                "parity": "even" if target % 2 == 0 else "odd",
                "note": "scanned",
            }
        )
    table = pd.DataFrame(rows)
    table.loc[table.index % 10 == 0, "digit"] = None
    table.loc[table.index % 20 == 15, "parity"] = None
    table.loc[[5, 7], ["digit", "parity"]] = None
    table.to_csv(folder / "labels.csv", index=False)
    return table


@pytest.fixture(scope="module")
def digits_manifest(tmp_path_factory) -> tuple[str, pd.DataFrame]:
    folder = tmp_path_factory.mktemp("digits")
    return str(folder / "labels.csv"), write_digits_manifest(folder)


def data_params(manifest: str, **more) -> dict:
    return {
        "source": "manifest",
        "manifest": manifest,
        "label_columns": ["digit", "parity"],
        **more,
    }


def test_several_label_columns_give_one_index_with_every_task(digits_manifest, caplog):
    manifest, table = digits_manifest
    index, class_names, *_ = index_images(data_params(manifest), seed=0)
    tasks = Tasks.from_class_names(class_names)
    assert class_names["classes"] == [str(d) for d in range(10)]
    assert class_names["tasks"] == {
        "digit": [str(d) for d in range(10)],
        "parity": ["even", "odd"],
    }
    # Rows 5 and 7 have no label at all: left out. Every other row is kept, once.
    assert (
        len(index) == N_IMAGES - 2
        and not index["location"].str.endswith(("0005.png", "0007.png")).any()
    )
    by_file = table.set_index(table["path"].str[:4]).drop(["0005", "0007"])
    labels = tasks.label_matrix(index)
    files = index["location"].str[-8:-4]
    expected_digit = by_file.loc[files, "digit"].map(lambda v: MISSING if pd.isna(v) else int(v))
    expected_parity = by_file.loc[files, "parity"].map({"even": 0, "odd": 1}).fillna(MISSING)
    np.testing.assert_array_equal(labels[:, 0], expected_digit.to_numpy())
    np.testing.assert_array_equal(labels[:, 1], expected_parity.to_numpy())
    # The first task stays in `label` / `class_name`, as single-label indexes have them.
    np.testing.assert_array_equal(index["label"], index[task_label_column("digit")])
    assert set(index.loc[index["label"] == MISSING, "class_name"]) == {""}
    assert (labels == MISSING).sum(axis=0).tolist() == [40, 20]
    assert set(index["split"]) == {"train", "val", "test"}


def test_a_single_label_column_keeps_the_single_task_form(digits_manifest):
    manifest, _ = digits_manifest
    index, class_names, *_ = index_images(data_params(manifest, label_columns="parity"), seed=0)
    assert class_names == {"classes": ["even", "odd"]}
    assert not [c for c in index.columns if c.startswith("label:")]
    assert len(index) == N_IMAGES - 22  # rows without a parity are left out: it is the only task


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        (["digit", "note"], "column 'note' (data.label_columns) has one class, 'scanned'"),
        (["digit", "colour"], "has no column 'colour' (data.label_columns)"),
        (["digit", "digit"], "must name one or more different columns"),
        (["digit", "path"], "must not hold data.path_column"),
    ],
)
def test_bad_label_columns_are_refused_naming_the_column(digits_manifest, columns, message):
    manifest, _ = digits_manifest
    with pytest.raises(DataSourceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_task_index(DataSettings.from_params(data_params(manifest, label_columns=columns)), 0)


def test_the_multi_task_loss_ignores_missing_labels_and_splits_like_a_mean():
    torch.manual_seed(0)
    labels = torch.tensor([[0, 1], [2, MISSING], [MISSING, 0], [1, 1], [2, 0], [0, MISSING]])
    settings = FinetuneSettings(label_smoothing=0.1)
    criterion = training_criterion(labels, {"digit": 3, "parity": 2}, settings)
    assert isinstance(criterion, MultiTaskLoss) and criterion.task_sizes == [3, 2]
    logits = torch.randn(6, 5, requires_grad=True)
    loss = criterion(logits, labels)
    loss.backward()
    # An image without a task's label sends no gradient into that task's logits.
    assert torch.all(logits.grad[2, :3] == 0) and torch.all(logits.grad[1, 3:] == 0)
    assert torch.all(logits.grad[5, 3:] == 0) and logits.grad[0].abs().min() > 0
    # Each term is its task's mean loss over the images with its label (all of the batch here
    # has the training share of labelled images).
    digit = training_loss(labels[[0, 1, 3, 4, 5], 0], 3, settings)
    parity = training_loss(labels[[0, 2, 3, 4], 1], 2, settings)
    expected = digit(logits[[0, 1, 3, 4, 5], :3], labels[[0, 1, 3, 4, 5], 0]) + parity(
        logits[[0, 2, 3, 4], 3:], labels[[0, 2, 3, 4], 1]
    )
    # Two float32 computations (the loss also scales each mean by its labelled share, 1 here up
    # to rounding): assert_close's float32 defaults, rtol 1.3e-6 and atol 1e-5, here and below.
    torch.testing.assert_close(loss, expected)
    # A per-image mean: two halves weighted by their size give the whole batch's loss, and a
    # half without any parity label adds 0 for it (not NaN).
    halves = (criterion(logits[:3], labels[:3]) + criterion(logits[3:], labels[3:])) / 2
    torch.testing.assert_close(halves, loss)
    no_parity = criterion(logits[[1, 5]], labels[[1, 5]])
    assert torch.isfinite(no_parity)


def test_uncertainty_weights_learn_to_down_weigh_the_harder_task():
    labels = torch.tensor([[0, 1], [1, 0]] * 8)
    criterion = training_criterion(
        labels, {"easy": 2, "hard": 2}, FinetuneSettings(task_weights="uncertainty")
    )
    optimiser = torch.optim.SGD(criterion.parameters(), lr=0.1)
    logits = torch.zeros(16, 4)
    logits[:, :2] = torch.nn.functional.one_hot(labels[:, 0], 2) * 6.0  # easy: nearly solved
    for _ in range(200):
        optimiser.zero_grad()
        criterion(logits, labels).backward()
        optimiser.step()
    easy, hard = criterion.task_weights()
    # exp(-s) tends to 1 / (2 L): the task with the larger loss weighs less.
    assert hard < 1.0 < easy
    terms = criterion.task_losses(logits, labels).detach()
    np.testing.assert_allclose([easy, hard], (1 / (2 * terms)).tolist(), rtol=0.05)


def test_mixing_and_class_balanced_draws_are_refused_with_several_tasks():
    images = TrainValImages(["a.png"] * 4, np.zeros((4, 2), int), ["b.png"], np.zeros((1, 2), int))
    recipe = Recipe(
        BackboneSettings(image_size=32),
        FinetuneSettings(
            epochs=1, batch_size=2, hflip=False, patience=None, mixup=0.2, freeze_stride=None
        ),
    )
    with pytest.raises(TrainingError, match=r"finetune.mixup=0.2 works on one label column"):
        train_classifier(
            images, {"a": 2, "b": 2}, recipe, TrainingRunSettings(), 0, torch.device("cpu"), "x"
        )


def _catalog(index, class_names, tmp_path, **more) -> DataCatalog:
    return DataCatalog(
        {
            "image_index": MemoryDataset(index),
            "class_names": MemoryDataset(class_names),
            "data_profile": MemoryDataset(
                {"typical_short_side": 8, "n_train": 240, "mirror_symmetric": False}
            ),
            "backbone": MemoryDataset({"name": "efficientnet_lite0", "image_size": 32}),
            "params:training": MemoryDataset({"checkpoint_dir": str(tmp_path), "progress": False}),
            "params:seed": MemoryDataset(3),
            "params:evaluation": MemoryDataset({}),
            "params:device": MemoryDataset("cpu"),
            "params:distributed": MemoryDataset({}),
            **{name: MemoryDataset(value) for name, value in more.items()},
        }
    )


def _run(strategy: str, training, catalog: DataCatalog) -> dict:
    """The strategy's training, then its evaluation on what training left (summary, model)."""
    outputs = {}
    for pipeline in (training, evaluation_for(strategy, register=False)):
        for name, dataset in SequentialRunner().run(pipeline, catalog).items():
            outputs[name] = dataset.load()
            catalog[name] = MemoryDataset(outputs[name])
    return outputs


def _served(model, files: list[str]) -> pd.DataFrame:
    """What `mlflow models serve` answers: base64 image bytes in, a table out."""
    images = [base64.b64encode(open(f, "rb").read()).decode() for f in files]
    return model.predict(pd.DataFrame({"image": images + ["not base64!"]}))


def _check_outputs(outputs: dict, strategy: str, index: pd.DataFrame, tmp_path) -> dict:
    report = outputs[f"{strategy}.metrics"]
    tasks = report["tasks"]
    assert list(tasks) == ["digit", "parity"]
    test = index[index["split"] == "test"]
    assert tasks["digit"]["n_test"] == (test["label:digit"] != MISSING).sum() < len(test)
    assert tasks["parity"]["n_test"] == (test["label:parity"] != MISSING).sum() < len(test)
    # The top-level keys stay the first task's.
    assert (
        report["accuracy"] == tasks["digit"]["accuracy"]
        and report["n_test"] == tasks["digit"]["n_test"]
    )
    per_class = outputs[f"{strategy}.per_class_metrics"]
    assert per_class.groupby("task").size().to_dict() == {"digit": 10, "parity": 2}
    assert len(outputs[f"{strategy}.confusion_matrix"].axes) == 4  # two panels, two colour bars
    assert (
        outputs[f"{strategy}.mlflow_metrics"]["parity.accuracy"]["value"]
        == tasks["parity"]["accuracy"]
    )
    # The packaged model, loaded back as MLflow loads it, answers every task.
    model = outputs[f"{strategy}.image_model"]
    folder = tmp_path / f"{strategy}_model"
    save_image_model(model, folder)
    assert json.loads(next(folder.rglob("model.json")).read_text())["tasks"]["parity"] == [
        "even",
        "odd",
    ]
    files = test["location"].head(5).tolist()
    answer = _served(load_image_model(folder), files)
    assert list(answer.columns) == [
        "predicted_digit",
        *[f"probability_digit_{d}" for d in range(10)],
        "predicted_parity",
        "probability_parity_even",
        "probability_parity_odd",
        "error",
        "error_message",
    ]
    assert answer["error"].tolist() == [""] * 5 + ["bad_base64"]
    assert answer.iloc[-1][["predicted_digit", "predicted_parity"]].tolist() == ["", ""]
    local = model.predict_files(files)
    # The loaded model runs its model.onnx (ONNX Runtime), the in-memory one PyTorch: the export
    # is checked equal to RELATIVE_TOLERANCE, measured up to 2e-5 apart on these probabilities.
    pd.testing.assert_frame_equal(
        answer.head(5), local, atol=RELATIVE_TOLERANCE, rtol=0, check_dtype=False
    )
    np.testing.assert_allclose(
        answer.filter(like="probability_parity_").head(5).sum(axis=1).astype(float), 1.0, atol=1e-6
    )
    return tasks


@pytest.mark.slow  # over 7 s alone: `make test` runs it, `make test-fast` does not
def test_feature_transfer_fits_one_head_per_task_on_one_set_of_features(digits_manifest, tmp_path):
    manifest, _ = digits_manifest
    index, class_names, *_ = index_images(data_params(manifest), seed=0)
    arrays, _, _ = extract_image_features(
        index,
        {"name": "efficientnet_lite0", "image_size": 32, "pretrained": True},
        {"batch_size": 64, "cache_dir": None},
        "cpu",
        {},
    )
    assert arrays["task_labels"].shape == (len(index), 2)
    catalog = _catalog(
        index,
        class_names,
        tmp_path,
        image_features=arrays,
        **{"params:head": {"type": "logistic_regression", "grid": {"C": [0.01, 1.0]}}},
    )
    outputs = _run("feature_transfer", feature_transfer(), catalog)
    summary = outputs["feature_transfer.training_summary"]
    assert list(summary["tasks"]) == ["digit", "parity"]
    heads = outputs["feature_transfer.image_model"].head.heads
    # Each head saw only the rows with its label: the digit head its ten classes, parity two.
    assert [list(h.classes_) for h in heads.values()] == [list(range(10)), [0, 1]]
    tasks = _check_outputs(outputs, "feature_transfer", index, tmp_path)
    assert tasks["digit"]["accuracy"] > 0.6 and tasks["parity"]["accuracy"] > 0.7


@pytest.mark.slow  # over 7 s alone: `make test` runs it, `make test-fast` does not
def test_fine_tuning_trains_one_network_for_every_task(digits_manifest, tmp_path):
    """With learned task weights; the default equal weights run in test_run's two-task run."""
    manifest, _ = digits_manifest
    index, class_names, *_ = index_images(data_params(manifest), seed=0)
    strategy = "parameter_transfer"
    catalog = _catalog(
        index,
        class_names,
        tmp_path,
        **{
            "params:finetune": {**RECIPE, "task_weights": "uncertainty"},
            f"params:{strategy}": {},
        },
    )
    outputs = _run(strategy, network_training_pipeline(strategy), catalog)
    network = outputs[f"{strategy}.image_model"].network_state
    assert network["head.weight"].shape[0] == 12  # one head: 10 digits and 2 parities side by side
    summary = outputs[f"{strategy}.training_summary"]
    weights = [summary["tasks"][t]["loss_weight"] for t in ("digit", "parity")]
    assert all(w != 1.0 for w in weights)
    history = outputs[f"{strategy}.training_history"]
    assert [p["step"] for p in history["val_accuracy.parity"]] == [1, 2, 3, 4, 5, 6]
    # Model selection follows the mean of the tasks' val accuracies.
    best = summary["best_epoch"] - 1
    mean = np.mean([history[f"val_accuracy.{t}"][best]["value"] for t in ("digit", "parity")])
    assert summary["best_val_accuracy"] == pytest.approx(mean)
    tasks = _check_outputs(outputs, strategy, index, tmp_path)
    assert tasks["digit"]["accuracy"] > 0.5 and tasks["parity"]["accuracy"] > 0.7


def test_pipelines_that_study_one_labelling_refuse_several_and_say_what_to_do(digits_manifest):
    manifest, _ = digits_manifest
    index, class_names, *_ = index_images(data_params(manifest), seed=0)
    with pytest.raises(
        ValueError,
        match=r"learning_curve pipeline works on one label column.*"
        r"data.label_columns=digit",
    ):
        draw_curve_subsets(index, class_names, {}, 0)
