"""`kedro run` as a user runs it, in a temporary copy of the project, offline on CPU.

One project holds the README's `kedro run` (no arguments), recorded right after it finishes; the
tests that follow run the other pipelines in it (prediction, two processes, concurrent runs,
backbone selection, domain adaptation, the learning curve), each comparing what it finds with
what was there before it, never with counts another test could change.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats

import transfer_learning
from tests.conftest import PROJECT_ROOT
from tests.kedro_project import (
    copy_project,
    digit_images,
    kedro,
    kedro_runs,
    latest_run,
    mlflow_client,
    noisy_digit_folders,
    offline_env,
    predict_with,
    run_python,
    started_kedro_run,
    succeeded,
    versions,
)
from tests.oracles import classification_metrics, colours_in_png
from transfer_learning.core.files import load_arrays
from transfer_learning.strategies import STRATEGIES, STRATEGY_NAMES

# Every test here runs `kedro run` in a subprocess: minutes, not seconds.
pytestmark = pytest.mark.slow

INDEX = "data/02_intermediate/image_index.parquet"
FEATURES = "data/04_feature/image_features.npz"


def predictions_folder(strategy: str) -> str:
    return f"data/07_model_output/{strategy}/test_predictions.npz"


VERSIONED = (INDEX, FEATURES, *(predictions_folder(s) for s in STRATEGY_NAMES))


@dataclass(frozen=True)
class DefaultRun:
    """The README's `kedro run` and what it left, recorded before any other run in its project."""

    project: Path
    reports: Path  # a copy of data/08_reporting (later runs overwrite the original)
    run_ids: tuple[str, ...]  # its MLflow runs
    versions: dict[str, tuple[str, ...]]  # versioned dataset folder → the versions it wrote

    def saved(self, dataset_folder: str, name: str) -> Path:
        """The file the run saved in a versioned dataset (its one version)."""
        (version,) = self.versions[dataset_folder]
        return self.project / dataset_folder / version / name


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> DefaultRun:
    project = copy_project(tmp_path_factory.mktemp("project"))
    succeeded(kedro(project))
    shutil.copytree(project / "data" / "08_reporting", project / "default_run_reports")
    return DefaultRun(
        project,
        project / "default_run_reports",
        tuple(run.info.run_id for run in kedro_runs(project)),
        {folder: tuple(sorted(versions(project / folder))) for folder in VERSIONED},
    )


def test_default_run_leaves_versioned_artefacts_and_readable_figures(default_run):
    assert all(len(found) == 1 for found in default_run.versions.values()), default_run.versions
    assert default_run.saved(INDEX, "image_index.parquet").is_file()
    metrics = json.loads((default_run.reports / "feature_transfer_metrics.json").read_text())
    assert metrics["accuracy"] > 0.8 and metrics["n_test"] == 360
    for strategy in STRATEGY_NAMES:
        # Blues at its dark end: the confusion matrix's well-classified diagonal (and its colour
        # bar); matplotlib's first colour: the reliability diagram's accuracy bars.
        matrix = default_run.reports / f"{strategy}_confusion_matrix.png"
        pixels = np.asarray(Image.open(matrix).convert("RGB")).astype(int)
        dark_blue = (pixels[..., 0] < 60) & (pixels[..., 1] < 110) & (pixels[..., 2] > 100)
        assert dark_blue.mean() > 0.03, strategy
        diagram = default_run.reports / f"{strategy}_reliability_diagram.png"
        assert colours_in_png(diagram, ["#1f77b4"])["#1f77b4"] > 10_000, strategy


def test_default_run_is_one_mlflow_run_with_params_metrics_and_artefacts(default_run):
    assert len(default_run.run_ids) == 1
    client = mlflow_client(default_run.project)
    run = client.get_run(default_run.run_ids[0])
    assert run.data.params["data.source"] == "digits"
    assert run.data.params["backbone.name"] == "auto"
    assert run.data.params["backbone.resolved.name"] == "efficientnet_lite0"
    assert "below 64 px: not ranked" in run.data.params["backbone.resolved.reason"]
    assert run.data.params["seed"] == "42"
    assert run.data.metrics["data.n_test"] == 360
    assert run.data.metrics["feature_transfer.accuracy"] > 0.8
    assert run.data.metrics["extraction.n_images"] == 1797
    assert run.data.metrics["extraction.images_per_second"] == pytest.approx(
        1797 / run.data.metrics["extraction.seconds"]
    )
    assert run.data.params["structure_transfer.backbone.pretrained"] == "False"
    assert run.data.params["backbone.image_size"] == "auto"
    # What auto resolved to on the 8 px digits, per strategy.
    for strategy in STRATEGY_NAMES:
        assert run.data.params[f"{strategy}.resolved.image_size"] == "48"
    assert run.data.params["parameter_transfer.resolved.hflip"] == "False"
    # How sure: every strategy's accuracy interval, and the recommendation as a tag.
    record = json.loads((default_run.reports / "comparison.json").read_text())
    for strategy in STRATEGY_NAMES:
        low, high = record["strategies"][strategy]["accuracy_interval"]
        assert run.data.metrics[f"{strategy}.accuracy_interval_low"] == pytest.approx(low)
        assert low <= run.data.metrics[f"{strategy}.accuracy"] <= high
    assert len(record["pairwise"]) == len(STRATEGY_NAMES) * (len(STRATEGY_NAMES) - 1) // 2
    recommended = run.data.tags["comparison.recommended_strategy"]
    assert recommended == record["recommendation"]["strategy"] and recommended in STRATEGY_NAMES
    comparison = (default_run.reports / "comparison.md").read_text()
    assert f"**Recommendation: {recommended}.**" in comparison
    history = client.get_metric_history(run.info.run_id, "parameter_transfer.val_accuracy")
    assert [point.step for point in history] == list(range(1, len(history) + 1))
    assert len(history) > 1
    artefacts = {a.path for a in client.list_artifacts(run.info.run_id, "feature_transfer")}
    assert "feature_transfer/feature_transfer_metrics.json" in artefacts


def test_second_run_reuses_features_and_keeps_the_first_runs_artefacts(default_run):
    project = default_run.project
    before = versions(project / INDEX)
    succeeded(kedro(project, "--pipelines=feature_extraction"))
    assert latest_run(project).data.metrics["extraction.cached"] == 1.0
    after = versions(project / INDEX)
    assert before < after and len(after - before) == 1


def test_bad_parameter_fails_with_a_clear_message_and_keeps_earlier_artefacts(default_run):
    project = default_run.project
    before = versions(project / INDEX)
    completed = kedro(
        project,
        "--pipelines=data_ingestion",
        "--params=data.source=imagefolder,data.path=/no/such/dir",
    )
    assert completed.returncode != 0
    assert "data.path='/no/such/dir' does not exist" in " ".join(
        (completed.stdout + completed.stderr).split()
    )
    assert versions(project / INDEX) == before


def test_default_run_compares_every_strategy_with_metrics_of_their_predictions(
    default_run,
):
    for strategy in STRATEGY_NAMES:
        metrics = json.loads((default_run.reports / f"{strategy}_metrics.json").read_text())
        assert metrics["strategy"] == strategy and metrics["n_test"] == 360
        assert metrics["image_size"] == 48 and metrics["fit_seconds"] > 0
        stored = load_arrays(
            default_run.saved(predictions_folder(strategy), "test_predictions.npz")
        )
        oracle = classification_metrics(stored["label"], stored["probabilities"])
        # The same stored probabilities, two float64 formulas of each metric: rounding only.
        for key, value in oracle.items():
            assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (strategy, key)
        # Every strategy's deployed model is calibrated on held-out images, never on test.
        models = default_run.project / "data" / "06_models" / strategy
        calibration = json.loads((models / "calibration.json").read_text())
        assert calibration["temperature"] == pytest.approx(metrics["temperature"])
        assert calibration["held_out_log_loss_after"] <= calibration["held_out_log_loss_before"]
        assert 0 <= metrics["ece_uncalibrated"] <= 1
    ensemble = json.loads(
        (
            default_run.project / "data" / "06_models" / "ensemble" / "training_summary.json"
        ).read_text()
    )
    assert sum(ensemble["weights"].values()) == pytest.approx(1.0)
    index = pd.read_parquet(default_run.saved(INDEX, "image_index.parquet"))
    # The images both members held out: the val split.
    assert ensemble["held_out_images"] == (index["split"] == "val").sum()
    comparison = (default_run.reports / "comparison.md").read_text()
    for strategy in STRATEGY_NAMES:
        assert f"| {strategy} |" in comparison
    assert "| image size (px) |" in comparison
    # One bar per strategy in its colour, in each panel.
    bars = colours_in_png(default_run.reports / "comparison.png", [s.colour for s in STRATEGIES])
    assert min(bars.values()) > 10_000, bars
    assert list(
        (default_run.project / "data" / "06_models" / "parameter_transfer" / "model.pt").glob(
            "*/model.pt"
        )
    )


def test_seed_environment_offline_stops_at_once_with_the_alternatives(tmp_path, monkeypatch):
    for key, value in offline_env().items():
        monkeypatch.setenv(key, value)
    project = copy_project(tmp_path)
    completed = kedro(project, "--env=seed", "--pipelines=data_ingestion")
    assert completed.returncode != 0
    message = " ".join((completed.stdout + completed.stderr).split())
    assert "Could not download torchvision dataset CIFAR10" in message
    assert "data.source=imagefolder" in message and "data.source=digits" in message


def test_seed_environment_runs_offline_from_local_images_and_weights(
    tmp_path, monkeypatch, make_image_folder
):
    import torch
    from torchvision.models import resnet18

    for key, value in offline_env().items():
        monkeypatch.setenv(key, value)
    images = make_image_folder({"cat": 12, "dog": 12}, splits=("train", "test"), suffix=".jpg")
    weights = tmp_path / "resnet18.pth"
    torch.save(resnet18().state_dict(), weights)
    project = copy_project(tmp_path / "project")
    params = ",".join(
        [
            "data.source=imagefolder",
            f"data.path={images}",
            f"backbone.weights_path={weights}",
            "backbone.image_size=32",
            "parameter_transfer.backbone.image_size=32",
            "structure_transfer.backbone.image_size=32",
            "finetune.epochs=1",
            "finetune.batch_size=8",
            "structure_transfer.finetune.epochs=1",
        ]
    )
    succeeded(kedro(project, "--env=seed", f"--params={params}"))
    comparison = (project / "data" / "08_reporting" / "comparison.md").read_text()
    assert "| parameter_transfer |" in comparison and "| structure_transfer |" in comparison


def test_the_default_run_says_in_mlflow_what_it_ran_on(default_run):
    """What the MLflow UI shows of it: a training experiment, a run named after its data, and
    the images of each split as an MLflow dataset (issue 31)."""
    client = mlflow_client(default_run.project)
    run = client.get_run(default_run.run_ids[0])
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.info.run_name == "__default__ · digits"
    assert run.data.tags["data.name"] == "digits" and run.data.tags["kedro.env"] == "local"
    assert run.data.tags["transfer_learning.version"] == transfer_learning.__version__
    inputs = {
        entry.tags[0].value: entry.dataset for entry in run.inputs.dataset_inputs
    }  # context → dataset
    assert set(inputs) == {"train", "val", "test"}
    assert {d.name for d in inputs.values()} == {"digits"}
    assert all("sklearn.datasets.load_digits" in d.source for d in inputs.values())
    assert len({d.digest for d in inputs.values()}) == 3
    assert json.loads(inputs["test"].profile)["num_rows"] == 360
    assert len(run.data.tags["data.fingerprint"]) == 16


def test_predict_labels_a_folder_and_lists_unreadable_files(default_run, tmp_path):
    images = digit_images(tmp_path / "new")
    (tmp_path / "new" / "broken.jpg").write_bytes(b"not a jpeg")
    completed = succeeded(
        kedro(
            default_run.project,
            "--pipelines=predict",
            f"--params=predict.path={tmp_path / 'new'},predict.strategy=parameter_transfer",
        )
    )
    predictions = pd.read_csv(
        default_run.project / "data" / "07_model_output" / "predictions.csv",
        keep_default_na=False,
    )
    assert len(predictions) == len(images) + 1
    run = latest_run(default_run.project)  # named after, and logging, the folder it labelled
    assert run.info.run_name == "predict · new"
    [entry] = run.inputs.dataset_inputs
    assert entry.dataset.name == "new" and entry.tags[0].value == "predict"
    assert json.loads(entry.dataset.profile)["num_rows"] == len(images) + 1
    broken = predictions[predictions["path"].str.endswith("broken.jpg")].iloc[0]
    assert broken["error"] == "unreadable_file" and broken["predicted_class"] == ""
    assert broken["error_message"] == "The file could not be read as an image."
    # Why, in the log of the user's own run (never in a served response); the log wraps lines.
    log = "".join((completed.stdout + completed.stderr).split())
    assert "cannotidentifyimagefile" in log
    labelled = predictions[predictions["error"] == ""].set_index("path")
    assert [f"probability_{d}" for d in range(10)] == [
        c for c in predictions.columns if c.startswith("probability_")
    ]
    correct = sum(
        str(labelled.loc[str(path), "predicted_class"]) == label for path, label in images
    )
    assert correct >= len(images) - 1


# The default run's registered models (version 1: the first registered in the project), loaded
# as a user's program would: from bytes and from files, then scored on the stored test images.
REGISTERED_MODELS = """
import base64, json, sys, mlflow, numpy as np, pandas as pd
project, paths, stored = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
out = {}
for strategy, predictions in stored.items():
    model = mlflow.pyfunc.load_model(f"models:/transfer_learning_{strategy}/1")
    images = [base64.b64encode(open(p, "rb").read()).decode() for p in paths]
    by_bytes = model.predict(pd.DataFrame({"image": images}))
    by_file = model.unwrap_python_model().predict_files(paths)
    assert (by_file["predicted_class"] == by_bytes["predicted_class"]).all()
    # The pyfunc entry (what a server runs) refuses server-side paths.
    assert (model.predict(pd.DataFrame({"path": paths}))["error"] == "path_not_allowed").all()
    test = np.load(predictions)
    served = model.unwrap_python_model().predict_files(test["location"].tolist())
    probabilities = served.filter(like="probability_").to_numpy()
    np.testing.assert_allclose(probabilities, test["probabilities"], rtol=0, atol=1e-6)
    out[strategy] = by_bytes["predicted_class"].tolist()
    assert mlflow.models.get_model_info(f"models:/transfer_learning_{strategy}/1").signature
# The comparison's choice, as MLflow users deploy it.
champion = mlflow.pyfunc.load_model("models:/transfer_learning@champion")
out["champion"] = champion.predict(pd.DataFrame({"image": images}))["predicted_class"].tolist()
version = mlflow.MlflowClient().get_model_version_by_alias("transfer_learning", "champion")
out["champion_strategy"] = version.tags["strategy"]
print(json.dumps(out))
"""


def test_registered_models_predict_in_a_fresh_process_as_they_were_evaluated(default_run, tmp_path):
    """Each registered model labels new digits, and its probabilities on the test images are
    the ones behind <strategy>_metrics.json: what was evaluated is what is deployed. So does
    `transfer_learning@champion`, the recommended strategy's; every version has a signature."""
    images = digit_images(tmp_path)
    stored = {
        strategy: str(default_run.saved(predictions_folder(strategy), "test_predictions.npz"))
        for strategy in STRATEGY_NAMES
    }
    paths = json.dumps([str(p) for p, _ in images])
    output = run_python(
        REGISTERED_MODELS, tmp_path, str(default_run.project), paths, json.dumps(stored)
    )
    predicted = json.loads(output.strip().splitlines()[-1])
    recommended = json.loads((default_run.reports / "comparison.json").read_text())
    assert predicted.pop("champion_strategy") == recommended["recommendation"]["strategy"]
    truth = [label for _, label in images]
    for strategy, labels in predicted.items():
        assert sum(a == b for a, b in zip(labels, truth, strict=True)) >= len(truth) - 1, strategy


@pytest.fixture(scope="module")
def two_task_run(tmp_path_factory):
    """`kedro run` on a manifest with two label columns, set in conf/local as a user would."""
    from tests.test_multi_task import write_digits_manifest

    project = copy_project(tmp_path_factory.mktemp("two_tasks"))
    images = project / "data" / "01_raw" / "digits"
    images.mkdir()
    table = write_digits_manifest(images, n_images=300)
    (project / "conf" / "local" / "parameters.yml").write_text(
        "data:\n  source: manifest\n  manifest: data/01_raw/digits/labels.csv\n"
        "  label_columns: [digit, parity]\n"
    )
    # Two epochs at 32 px: the assertions are about every task being carried through.
    succeeded(
        kedro(
            project,
            "--params=finetune.epochs=2,structure_transfer.finetune.epochs=2,"
            "backbone.image_size=32",
        )
    )
    return project, images, table


def test_a_two_task_run_evaluates_and_compares_every_task(two_task_run):
    project, _, _ = two_task_run
    reports = project / "data" / "08_reporting"
    comparison = (reports / "comparison.md").read_text()
    for strategy in STRATEGY_NAMES:
        metrics = json.loads((reports / f"{strategy}_metrics.json").read_text())
        assert list(metrics["tasks"]) == ["digit", "parity"], strategy
        assert metrics["accuracy"] == metrics["tasks"]["digit"]["accuracy"]
        for task in ("digit", "parity"):
            accuracy = metrics["tasks"][task]["accuracy"]
            assert f"| {strategy} | {task} | {accuracy:.4f} |" in comparison
        per_class = pd.read_csv(reports / f"{strategy}_per_class.csv")
        assert per_class["task"].value_counts().to_dict() == {"digit": 10, "parity": 2}
    # The default task weights: every task's loss weighs 1.
    summaries = project / "data" / "06_models" / "parameter_transfer" / "training_summary.json"
    summary = json.loads(summaries.read_text())
    assert [task["loss_weight"] for task in summary["tasks"].values()] == [1.0, 1.0]
    feature_transfer = json.loads((reports / "feature_transfer_metrics.json").read_text())
    assert feature_transfer["tasks"]["parity"]["accuracy"] > 0.8


def test_a_two_task_model_predicts_every_task(two_task_run):
    project, images, table = two_task_run
    predictions = predict_with(project, images, "feature_transfer")
    assert ["predicted_digit", "probability_digit_0"] == list(predictions.columns[1:3])
    assert "predicted_parity" in predictions and "probability_parity_odd" in predictions
    truth = table.set_index("path")["parity"].reindex(predictions["path"].str[-8:]).to_numpy()
    known = pd.notna(truth)
    assert (predictions["predicted_parity"].to_numpy()[known] == truth[known]).mean() > 0.8


SERVED_COLUMNS = """
import base64, sys, mlflow, pandas as pd
mlflow.set_tracking_uri(f"sqlite:///{sys.argv[1]}/mlflow.db")
model = mlflow.pyfunc.load_model("models:/transfer_learning_parameter_transfer/1")
image = base64.b64encode(open(sys.argv[2], "rb").read()).decode()
print(",".join(model.predict(pd.DataFrame({"image": [image]})).columns))
"""


def test_a_two_task_registered_model_serves_every_task(two_task_run, tmp_path):
    project, images, _ = two_task_run
    output = run_python(SERVED_COLUMNS, tmp_path, str(project), str(images / "0001.png"))
    columns = output.strip().splitlines()[-1].split(",")
    assert columns[0] == "predicted_digit" and columns[11] == "predicted_parity"
    assert columns[-2:] == ["error", "error_message"]


def test_parameter_transfer_on_two_processes_is_one_run_with_one_set_of_outputs(default_run):
    project = default_run.project
    models = project / "data" / "06_models" / "parameter_transfer"
    outputs = ("model.pt", "image_model")
    before = {output: versions(models / output) for output in outputs}
    runs_before = {run.info.run_id for run in kedro_runs(project)}
    completed = succeeded(
        kedro(
            project,
            "--pipelines=parameter_transfer",
            "--params=distributed.nproc_per_node=2,parameter_transfer.finetune.epochs=2",
        )
    )
    assert "Starting 2 worker processes" in completed.stdout + completed.stderr
    # One Kedro run: one MLflow run, one new version of each output, one checkpoint.
    new_runs = [run for run in kedro_runs(project) if run.info.run_id not in runs_before]
    assert len(new_runs) == 1
    run = new_runs[0]
    assert run.data.params["distributed.nproc_per_node"] == "2"
    history = mlflow_client(project).get_metric_history(
        run.info.run_id, "parameter_transfer.val_accuracy"
    )
    assert [point.step for point in history] == [1, 2]
    assert max(point.value for point in history) > 0.5
    for output in outputs:
        assert len(versions(models / output) - before[output]) == 1, output
    checkpoints = project / "data" / "06_models" / "checkpoints" / "parameter_transfer"
    assert [p.name for p in checkpoints.iterdir()] == ["last.pt"]


def test_two_runs_started_at_once_both_finish_with_intact_outputs(default_run):
    """Two `kedro run`s of the same pipeline at once in one project: both extract the same
    (uncached) features into the shared cache, log to the one SQLite MLflow database and
    register the same model name."""
    from transfer_learning.serving.packaging import load_image_model, local_image_classifier

    project = default_run.project
    client = mlflow_client(project)
    registered = "name='transfer_learning_feature_transfer'"
    folders = {
        "models": project / "data" / "06_models" / "feature_transfer" / "image_model",
        "features": project / FEATURES,
        "cache": project / "data" / "04_feature" / "cache",
    }
    before = {name: set(folder.iterdir()) for name, folder in folders.items()}
    runs_before = {run.info.run_id for run in kedro_runs(project)}
    registered_before = len(client.search_model_versions(registered))

    logs = [project / f"concurrent_{i}.log" for i in range(2)]
    # An image size no earlier run used: both runs extract and write the same cache entry.
    runs = [
        started_kedro_run(
            project,
            log,
            "--pipelines=feature_transfer",
            "--params=backbone.image_size=40,head.type=prototype",
        )  # fmt: skip
        for log in logs
    ]
    for run, log in zip(runs, logs, strict=True):
        assert run.wait(timeout=900) == 0, log.read_text()[-3000:]

    new_runs = [run for run in kedro_runs(project) if run.info.run_id not in runs_before]
    assert len(new_runs) == 2 and {run.info.status for run in new_runs} == {"FINISHED"}
    assert all(run.data.metrics["feature_transfer.accuracy"] > 0.5 for run in new_runs)
    assert len(client.search_model_versions(registered)) == registered_before + 2
    new = {name: sorted(set(folder.iterdir()) - before[name]) for name, folder in folders.items()}
    assert len(new["models"]) == 2 and len(new["features"]) == 2
    for version in new["models"]:
        model = local_image_classifier(load_image_model(version / "image_model"))
        assert model.predict_files(["sklearn-digits:0"])["error"].tolist() == [""]
    first, second = (load_arrays(v / "image_features.npz")["features"] for v in new["features"])
    np.testing.assert_array_equal(first, second)
    assert [entry.suffix for entry in new["cache"]] == [".npy"]  # one entry, no partial files
    np.testing.assert_array_equal(np.load(new["cache"][0]), first)


def test_backbone_selection_ranks_and_auto_backbone_uses_its_pick(default_run):
    project = default_run.project
    sample = "--params=selection.max_images=200"
    succeeded(kedro(project, "--pipelines=backbone_selection", f"{sample},selection.controls=true"))
    reporting = project / "data" / "08_reporting"
    (saved,) = (reporting / "backbone_ranking.csv").glob("*/backbone_ranking.csv")
    ranking = pd.read_csv(saved)
    # 8 px digits: the three offline networks at 48 px, and their random-weight controls.
    assert sorted(ranking["candidate"]) == sorted(
        f"efficientnet_lite{v}@48{suffix}" for v in (0, 1, 2) for suffix in ("", " (random)")
    )
    assert ranking["pretrained"].tolist() == [True] * 3 + [False] * 3
    pick = json.loads((reporting / "backbone_recommendation.json").read_text())
    # The fewest GFLOPs among the pretrained candidates within one standard error of the best.
    pretrained = ranking[ranking["pretrained"]]
    best = pretrained.loc[pretrained["probe_accuracy"].idxmax()]
    close = pretrained[
        pretrained["probe_accuracy"] >= best["probe_accuracy"] - best["probe_accuracy_se"]
    ]
    assert pick["name"] == close.loc[close["gflops"].idxmin(), "name"] and pick["image_size"] == 48
    report = (reporting / "backbone_ranking.md").read_text()
    assert f"Recommended: **{pick['name']} at 48 px**" in report and "kendall_tau" in report
    # One point per candidate against its probe accuracy, in each score's panel.
    assert colours_in_png(reporting / "backbone_ranking.png", ["#1f77b4"])["#1f77b4"] > 500
    assert "backbone_selection.logme.kendall_tau" in latest_run(project).data.metrics

    # 8 px digits are not ranked for backbone.name=auto (the unit tests cover a reused ranking).
    succeeded(kedro(project, "--pipelines=feature_transfer", f"{sample},backbone.name=auto"))
    params = latest_run(project).data.params
    assert params["backbone.resolved.name"] == "efficientnet_lite0"
    assert "below 64 px: not ranked" in params["backbone.resolved.reason"]
    metrics = json.loads((reporting / "feature_transfer_metrics.json").read_text())
    assert metrics["accuracy"] > 0.8


def test_viz_build_shows_every_pipeline_in_layers(default_run):
    project = default_run.project
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"}
    completed = subprocess.run(
        [sys.executable, "-m", "kedro", "viz", "build", "--include-previews"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    graph = json.loads((project / "build" / "api" / "main").read_text())
    pipelines = {p["id"] for p in graph["pipelines"]}
    assert {
        "data_ingestion",
        "data_quality",
        "backbone_selection",
        "feature_extraction",
        "feature_transfer",
        "parameter_transfer",
        "structure_transfer",
        "evaluation",
        "predict",
        "domain_adaptation",
        "learning_curve",
    } <= pipelines
    assert set(graph["layers"]) == {
        "raw",
        "intermediate",
        "feature",
        "model_input",
        "models",
        "model_output",
        "reporting",
    }
    layer_of = {n["name"]: n.get("layer") for n in graph["nodes"] if n["type"] == "data"}
    assert (
        layer_of["image_features"] == "feature"
        and layer_of["parameter_transfer.metrics"] == "reporting"
    )
    # A pipeline outside __default__ has its own graph.
    adaptation = json.loads(
        (project / "build" / "api" / "pipelines" / "domain_adaptation").read_text()
    )
    layer_of = {n["name"]: n.get("layer") for n in adaptation["nodes"] if n["type"] == "data"}
    assert layer_of["target_index"] == "intermediate" and layer_of["target_features"] == "feature"
    assert layer_of["target_images"] == "model_input"
    assert layer_of["adapted_image_models"] == "models"
    assert layer_of["domain_adaptation_report"] == "reporting"
    # The comparison previewed in kedro-viz: its report rendered, its record and each strategy's
    # metrics as JSON.
    previews = {}
    for node in (project / "build" / "api" / "nodes").iterdir():
        details = json.loads(node.read_text())
        if details.get("filepath"):
            previews[Path(details["filepath"]).name] = details
    report = previews["comparison.md"]
    assert report["preview_type"] == "HTMLPreview" and "<table>" in report["preview"]
    assert previews["comparison.json"]["preview_type"] == "JSONPreview"
    assert "recommendation" in json.dumps(previews["comparison.json"]["preview"])
    assert previews["feature_transfer_metrics.json"]["preview_type"] == "JSONPreview"


def test_notebook_runs_top_to_bottom(default_run):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(PROJECT_ROOT / "notebooks" / "compare_strategies.ipynb", as_version=4)
    NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(default_run.project)}},
    ).execute()
    outputs = [
        o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
    ]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    # A confusion matrix and a reliability diagram per strategy.
    assert len(images) == 2 * len(STRATEGY_NAMES)


@pytest.fixture(scope="module")
def adaptation_run(default_run, tmp_path_factory):
    """`kedro run --pipelines=domain_adaptation` in the default run's project (its features are
    cached there). It trains the source models again: with a third of the default fine-tuning
    steps and MCC's continued training cut short, since no assertion depends on their length."""
    project = default_run.project
    target = noisy_digit_folders(tmp_path_factory.mktemp("noisy_digits"))
    adapted = project / "data" / "06_models" / "adapted_image_models.json"
    before = versions(adapted)
    succeeded(
        kedro(
            project,
            "--pipelines=domain_adaptation",
            f"--params=data.target_path={target},finetune.steps=60,adaptation.mcc.steps=10",
        )
    )
    (listing,) = versions(adapted) - before
    return project, target, json.loads(next((adapted / listing).glob("*.json")).read_text())


def test_domain_adaptation_run_reports_saves_and_registers_every_method(adaptation_run):
    project, _, listing = adaptation_run
    reports = project / "data" / "08_reporting"
    metrics = json.loads((reports / "domain_adaptation_metrics.json").read_text())
    assert list(metrics["feature_transfer"]) == ["source_only", "target_standardisation", "coral"]
    assert list(metrics["parameter_transfer"]) == ["source_only", "adabn", "tent", "mcc"]
    assert metrics["n_target_test"] == 75 and metrics["n_target_adapt"] == 75
    fine_tuned = metrics["parameter_transfer"]
    # Heavy noise on 8 px digits: re-estimated BatchNorm statistics recover much of the loss.
    assert (
        fine_tuned["adabn"]["target_accuracy"] > fine_tuned["source_only"]["target_accuracy"] + 0.1
    )
    # A bar per method in its strategy's colour.
    colours = colours_in_png(reports / "domain_adaptation.png", [s.colour for s in STRATEGIES[:2]])
    assert min(colours.values()) > 2_000, colours
    assert "## How different are the domains?" in (reports / "domain_adaptation.md").read_text()
    assert len(listing["models"]) == 5
    for name in listing["models"]:
        saved = project / "data" / "06_models" / name / "image_model" / listing["version"]
        assert (saved / "image_model" / "MLmodel").exists(), name
    registered = {m.name for m in mlflow_client(project).search_registered_models()}
    assert {f"transfer_learning_{name}" for name in listing["models"]} <= registered


def test_predict_uses_an_adapted_model(adaptation_run):
    project, target, _ = adaptation_run
    predictions = predict_with(project, target / "3", "parameter_transfer_adabn")
    assert len(predictions) == 15 and (predictions["error"].isna()).all()
    assert (predictions["predicted_class"].astype(str) == "3").mean() > 0.4


def test_learning_curve_run_reports_every_point_as_an_mlflow_child_run(default_run):
    project = default_run.project
    # Lists cannot be given with --params (it splits on commas): a user sets them in conf/local.
    (project / "conf" / "local" / "parameters_learning_curve.yml").write_text(
        "curve:\n  per_class: [1, 3]\n  repeats: 2\n"
        "  strategies: [feature_transfer, parameter_transfer]\n"
    )
    try:
        completed = succeeded(
            kedro(
                project,
                "--pipelines=learning_curve",
                "--params=finetune.steps=5,head.selection=val,training.progress=false",
            )
        )
    finally:
        (project / "conf" / "local" / "parameters_learning_curve.yml").unlink()
    assert "(cached)" in completed.stdout + completed.stderr  # features of the default run
    reports = project / "data" / "08_reporting"
    curve = pd.read_csv(reports / "learning_curve.csv")
    assert len(curve) == 2 * 2 * 2
    assert set(curve["strategy"]) == {"feature_transfer", "parameter_transfer"}
    assert set(curve["per_class"].astype(str)) == {"1", "3"} and set(curve["seed"]) == {42, 43}
    # Ten digit classes, 360 test images: chance is 10 % (± 1.6 points); pretrained features
    # with one or three images a class reach far more. (Five fine-tuning steps teach the
    # network nothing yet: its points are checked for their bookkeeping, below.)
    features = curve[curve["strategy"] == "feature_transfer"]
    assert (features["accuracy"] > 0.4).all(), features
    ones = curve[curve["per_class"].astype(str) == "1"]
    assert (ones.loc[ones["strategy"] == "feature_transfer", "head"] == "prototype").all()
    assert_report_intervals(curve, (reports / "learning_curve.md").read_text())
    lines = colours_in_png(reports / "learning_curve.png", [s.colour for s in STRATEGIES[:2]])
    assert min(lines.values()) > 200, lines
    parent = latest_run(project)
    assert_one_child_run_per_point(project, parent, curve)
    artefacts = {
        a.path for a in mlflow_client(project).list_artifacts(parent.info.run_id, "learning_curve")
    }
    assert "learning_curve/learning_curve.csv" in artefacts


def assert_report_intervals(curve: pd.DataFrame, report: str) -> None:
    """The report's mean and 95 % t-interval over the seeds, computed here apart."""
    for (strategy, per_class), rows in curve.groupby(["strategy", "per_class"]):
        mean, spread = rows["accuracy"].mean(), rows["accuracy"].std(ddof=1)
        half = stats.t.ppf(0.975, df=len(rows) - 1) * spread / np.sqrt(len(rows))
        cell = f"{mean:.3f} ({mean - half:.3f}–{mean + half:.3f})"
        row = f"| {strategy} | {per_class} | {float(per_class):.1f} | {len(rows)} | {cell} |"
        assert row in report, row


def assert_one_child_run_per_point(project: Path, parent, curve: pd.DataFrame) -> None:
    """One MLflow child run per point of the curve, with that point's parameters and accuracy."""
    children = mlflow_client(project).search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    logged = {
        (c.data.params["strategy"], c.data.params["per_class"], c.data.params["seed"]): c
        for c in children
    }
    assert len(children) == len(curve) == len(logged)
    for row in curve.itertuples():
        child = logged[(row.strategy, str(row.per_class), str(row.seed))]
        assert child.data.metrics["accuracy"] == pytest.approx(row.accuracy, abs=1e-12)


def test_data_quality_run_reports_versioned_tables_and_logs_them(default_run):
    project = default_run.project
    reports = project / "data" / "08_reporting"
    completed = succeeded(kedro(project, "--pipelines=data_quality"))
    assert "(cached)" in completed.stdout + completed.stderr  # features of the default run
    saved = {
        name: (reports / f"{name}.csv").glob(f"*/{name}.csv")
        for name in ("label_issues", "test_label_issues", "label_noise_rates", "outliers")
    }
    saved = {name: list(files) for name, files in saved.items()}
    assert all(len(files) == 1 for files in saved.values()), saved  # one version each
    issues = pd.read_csv(saved["label_issues"][0])
    assert len(issues) == 1797 - 360 and issues["label_quality"].is_monotonic_increasing
    assert set(issues.columns) >= {"path", "given_label", "suggested_label", "is_label_issue"}
    # The digits are cleanly labelled: few are flagged.
    assert issues["is_label_issue"].mean() < 0.03
    assert "# Data quality" in (reports / "data_quality.md").read_text()
    assert (reports / "label_issues.png").stat().st_size > 10_000
    run = latest_run(project)
    assert run.data.metrics["data_quality.label_issues"] == issues["is_label_issue"].sum()
    artefacts = {
        a.path for a in mlflow_client(project).list_artifacts(run.info.run_id, "data_quality")
    }
    assert {"data_quality/label_issues.csv", "data_quality/data_quality.md"} <= artefacts
    # The default run's reports are still there, untouched.
    assert (reports / "comparison.md").read_text() == (
        default_run.reports / "comparison.md"
    ).read_text()

    # data.on_label_issue=drop: the flagged train/val images leave training, test stays as it
    # was, and data_quality's next run still judges every image.
    succeeded(kedro(project, "--pipelines=data_quality", "--params=data.on_label_issue=drop"))
    indexes = sorted((project / "data" / "02_intermediate").glob("image_index.parquet/*/*"))
    kept, dropped = (pd.read_parquet(path) for path in indexes[-2:])
    flagged = set(issues.loc[issues["is_label_issue"], "path"])
    assert set(dropped.loc[dropped["split"] == "dropped", "location"]) == flagged
    assert dropped[dropped["split"] == "test"].equals(kept[kept["split"] == "test"])
    assert latest_run(project).data.metrics["data.n_dropped_label_issues"] == len(flagged)
    again = pd.read_csv(sorted(reports.glob("label_issues.csv/*/label_issues.csv"))[-1])
    assert len(again) == len(issues) and (again["split"] == "dropped").sum() == len(flagged)
