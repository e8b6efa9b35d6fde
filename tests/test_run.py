"""`kedro run` as a user runs it, in a temporary copy of the project, offline on CPU."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import PROJECT_ROOT
from transfer_learning.strategies import STRATEGY_NAMES

# Every test here runs `kedro run` in a subprocess: minutes, not seconds.
pytestmark = pytest.mark.slow


def copy_project(target: Path) -> Path:
    for name in ("conf", "src", "pyproject.toml", ".telemetry"):
        source = PROJECT_ROOT / name
        if source.is_dir():
            shutil.copytree(
                source,
                target / name,
                ignore=shutil.ignore_patterns("local", "__pycache__", "*.egg-info"),
            )
        else:
            shutil.copy(source, target / name)
    (target / "conf" / "local").mkdir()
    for layer in (
        "01_raw",
        "02_intermediate",
        "04_feature",
        "06_models",
        "07_model_output",
        "08_reporting",
    ):
        (target / "data" / layer).mkdir(parents=True)
    return target


def kedro_environment() -> dict[str, str]:
    """This environment without MLflow settings (the project's own apply), telemetry off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(KEDRO_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
    return env


def kedro(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kedro", "run", *args],
        cwd=project,
        env=kedro_environment(),
        capture_output=True,
        text=True,
        timeout=900,
        stdin=subprocess.DEVNULL,
    )


def predict_with(project: Path, folder: Path, strategy: str) -> pd.DataFrame:
    """`kedro run --pipelines=predict` on `folder` with `strategy`'s model; its predictions.csv."""
    completed = kedro(
        project,
        "--pipelines=predict",
        f"--params=predict.path={folder},predict.strategy={strategy}",
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return pd.read_csv(project / "data" / "07_model_output" / "predictions.csv")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    project = copy_project(tmp_path_factory.mktemp("project"))
    completed = kedro(project)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    # Later tests run other pipelines in the same project: keep this run's reports apart.
    shutil.copytree(project / "data" / "08_reporting", project / "default_run_reports")
    return project, completed


def test_default_run_leaves_versioned_artefacts(default_run):
    project, _ = default_run
    versions = list((project / "data" / "02_intermediate" / "image_index.parquet").iterdir())
    assert len(versions) == 1 and (versions[0] / "image_index.parquet").is_file()
    assert list(
        (project / "data" / "04_feature" / "image_features.npz").glob("*/image_features.npz")
    )
    metrics = json.loads(
        (project / "data" / "08_reporting" / "feature_transfer_metrics.json").read_text()
    )
    assert metrics["accuracy"] > 0.8 and metrics["n_test"] == 360
    assert (
        project / "data" / "08_reporting" / "feature_transfer_confusion_matrix.png"
    ).stat().st_size > 0
    assert (
        project / "data" / "08_reporting" / "feature_transfer_reliability_diagram.png"
    ).stat().st_size > 0


def test_default_run_is_one_mlflow_run_with_params_metrics_and_artefacts(default_run):
    project, _ = default_run
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("transfer_learning")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["data.source"] == "digits"
    assert run.data.params["backbone.name"] == "efficientnet_lite0"
    assert run.data.params["seed"] == "42"
    assert run.data.metrics["data.n_test"] == 360
    assert run.data.metrics["feature_transfer.accuracy"] > 0.8
    assert run.data.metrics["extraction.images_per_second"] > 0
    assert run.data.params["structure_transfer.backbone.pretrained"] == "False"
    assert run.data.params["backbone.image_size"] == "auto"
    # What auto resolved to on the 8 px digits, per strategy.
    for strategy in STRATEGY_NAMES:
        assert run.data.params[f"{strategy}.resolved.image_size"] == "48"
    assert run.data.params["parameter_transfer.resolved.hflip"] == "False"
    history = client.get_metric_history(run.info.run_id, "parameter_transfer.val_accuracy")
    assert [point.step for point in history] == list(range(1, len(history) + 1)) and len(
        history
    ) > 1
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    artefacts = {a.path for a in client.list_artifacts(run.info.run_id, "feature_transfer")}
    assert "feature_transfer/feature_transfer_metrics.json" in artefacts


def test_second_run_reuses_features_and_keeps_the_first_runs_artefacts(default_run):
    project, _ = default_run
    completed = kedro(project, "--pipelines=feature_extraction")
    assert completed.returncode == 0, completed.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("transfer_learning")
    latest = client.search_runs(
        [experiment.experiment_id], order_by=["attributes.start_time DESC"]
    )[0]
    assert latest.data.metrics["extraction.cached"] == 1.0
    assert len(list((project / "data" / "02_intermediate" / "image_index.parquet").iterdir())) == 2


def test_bad_parameter_fails_with_a_clear_message_and_keeps_earlier_artefacts(default_run):
    project, _ = default_run
    before = sorted((project / "data" / "02_intermediate" / "image_index.parquet").iterdir())
    completed = kedro(
        project,
        "--pipelines=data_ingestion",
        "--params=data.source=imagefolder,data.path=/no/such/dir",
    )
    assert completed.returncode != 0
    assert "data.path='/no/such/dir' does not exist" in " ".join(
        (completed.stdout + completed.stderr).split()
    )
    assert (
        sorted((project / "data" / "02_intermediate" / "image_index.parquet").iterdir()) == before
    )


def test_default_run_compares_all_three_strategies(default_run):
    project, _ = default_run
    reports = project / "data" / "08_reporting"
    for strategy in STRATEGY_NAMES:
        metrics = json.loads((reports / f"{strategy}_metrics.json").read_text())
        assert metrics["strategy"] == strategy and metrics["n_test"] == 360
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "ece", "fit_seconds"):
            assert key in metrics
        assert metrics["image_size"] == 48
    comparison = (reports / "comparison.md").read_text()
    for strategy in STRATEGY_NAMES:
        assert f"| {strategy} |" in comparison
    assert "| image size (px) |" in comparison
    assert (reports / "comparison.png").stat().st_size > 0
    assert list(
        (project / "data" / "06_models" / "parameter_transfer" / "model.pt").glob("*/model.pt")
    )


def offline_env() -> dict[str, str]:
    # This machine has no route to the internet anyway; the proxy makes that fail fast everywhere.
    return {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "NO_PROXY": ""}


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
    from torchvision.models import resnet18

    for key, value in offline_env().items():
        monkeypatch.setenv(key, value)
    images = make_image_folder({"cat": 12, "dog": 12}, splits=("train", "test"), suffix=".jpg")
    weights = tmp_path / "resnet18.pth"
    import torch

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
    completed = kedro(project, "--env=seed", f"--params={params}")
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    comparison = (project / "data" / "08_reporting" / "comparison.md").read_text()
    assert "| parameter_transfer |" in comparison and "| structure_transfer |" in comparison


def digit_images(folder: Path, count: int = 6) -> list[tuple[Path, str]]:
    """Real handwritten digits from scikit-learn, written as PNG files of another size."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    written = []
    for i in range(count):
        path = folder / "nested" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(digits.images[i] * 255 / 16).astype(np.uint8)).resize(
            (24, 24)
        ).save(path)
        written.append((path, str(digits.target[i])))
    return written


def test_predict_labels_a_folder_and_lists_unreadable_files(default_run, tmp_path):
    import pandas as pd

    project, _ = default_run
    images = digit_images(tmp_path / "new")
    (tmp_path / "new" / "broken.jpg").write_bytes(b"not a jpeg")
    completed = kedro(
        project,
        "--pipelines=predict",
        f"--params=predict.path={tmp_path / 'new'},predict.strategy=parameter_transfer",
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    predictions = pd.read_csv(
        project / "data" / "07_model_output" / "predictions.csv", keep_default_na=False
    )
    assert len(predictions) == len(images) + 1
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


def test_registered_models_predict_in_a_fresh_process(default_run, tmp_path):
    project, _ = default_run
    images = digit_images(tmp_path)
    script = f"""
import base64, json, mlflow, pandas as pd
mlflow.set_tracking_uri("sqlite:///{project / "mlflow.db"}")
paths = {[str(p) for p, _ in images]!r}
out = {{}}
for strategy in {STRATEGY_NAMES!r}:
    model = mlflow.pyfunc.load_model(f"models:/transfer_learning_{{strategy}}/1")
    by_bytes = model.predict(pd.DataFrame({{"image": [base64.b64encode(open(p, "rb").read()).decode() for p in paths]}}))
    by_file = model.unwrap_python_model().predict_files(paths)
    assert (by_file["predicted_class"] == by_bytes["predicted_class"]).all()
    # The pyfunc entry (what a server runs) refuses server-side paths.
    assert (model.predict(pd.DataFrame({{"path": paths}}))["error"] == "path_not_allowed").all()
    out[strategy] = by_bytes["predicted_class"].tolist()
print(json.dumps(out))
"""
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    predicted = json.loads(completed.stdout.strip().splitlines()[-1])
    truth = [label for _, label in images]
    for strategy, labels in predicted.items():
        assert sum(a == b for a, b in zip(labels, truth, strict=True)) >= len(truth) - 1, strategy


def test_metrics_describe_the_registered_model(default_run, tmp_path):
    """The probabilities behind <strategy>_metrics.json are the served model's on the same images."""
    project, _ = default_run
    script = f"""
import glob, mlflow, numpy as np, pandas as pd
from sklearn.metrics import accuracy_score
mlflow.set_tracking_uri("sqlite:///{project / "mlflow.db"}")
for strategy in {STRATEGY_NAMES!r}:
    stored = np.load(glob.glob("{project}/data/07_model_output/" + strategy + "/test_predictions.npz/*/*.npz")[0])
    model = mlflow.pyfunc.load_model(f"models:/transfer_learning_{{strategy}}/1")
    served = model.unwrap_python_model().predict_files(stored["location"].tolist())
    probabilities = served[[c for c in served.columns if c.startswith("probability_")]].to_numpy()
    np.testing.assert_allclose(probabilities, stored["probabilities"], rtol=0, atol=1e-6)
    print(strategy, accuracy_score(stored["label"], probabilities.argmax(1)))
"""
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    served_accuracy = dict(line.split() for line in completed.stdout.strip().splitlines())
    reports = project / "data" / "08_reporting"
    for strategy in STRATEGY_NAMES:
        metrics = json.loads((reports / f"{strategy}_metrics.json").read_text())
        assert float(served_accuracy[strategy]) == pytest.approx(metrics["accuracy"], abs=1e-12)


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
    completed = kedro(project, "--params=finetune.epochs=2,structure_transfer.finetune.epochs=2")
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
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


def test_a_two_task_registered_model_serves_every_task(two_task_run, tmp_path):
    project, images, _ = two_task_run
    script = f"""
import base64, mlflow, pandas as pd
mlflow.set_tracking_uri("sqlite:///{project / "mlflow.db"}")
model = mlflow.pyfunc.load_model("models:/transfer_learning_parameter_transfer/1")
image = base64.b64encode(open("{images / "0001.png"}", "rb").read()).decode()
print(",".join(model.predict(pd.DataFrame({{"image": [image]}})).columns))
"""
    served = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert served.returncode == 0, served.stderr[-3000:]
    columns = served.stdout.strip().splitlines()[-1].split(",")
    assert columns[0] == "predicted_digit" and columns[11] == "predicted_parity"
    assert columns[-2:] == ["error", "error_message"]


def test_parameter_transfer_on_two_processes_is_one_run_with_one_set_of_outputs(default_run):
    project, _ = default_run
    models = project / "data" / "06_models" / "parameter_transfer"
    outputs = ("model.pt", "image_model")
    before = {output: {p.name for p in (models / output).iterdir()} for output in outputs}
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("transfer_learning")
    runs_before = len(client.search_runs([experiment.experiment_id]))
    completed = kedro(
        project,
        "--pipelines=parameter_transfer",
        "--params=distributed.nproc_per_node=2,parameter_transfer.finetune.epochs=2",
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "Starting 2 worker processes" in completed.stdout + completed.stderr
    # One Kedro run: one MLflow run, one new version of each output, one checkpoint.
    assert len(client.search_runs([experiment.experiment_id])) == runs_before + 1
    run = latest_run(project)
    assert run.data.params["distributed.nproc_per_node"] == "2"
    history = client.get_metric_history(run.info.run_id, "parameter_transfer.val_accuracy")
    assert [point.step for point in history] == [1, 2]
    assert max(point.value for point in history) > 0.5
    for output in outputs:
        assert len({p.name for p in (models / output).iterdir()} - before[output]) == 1, output
    checkpoints = project / "data" / "06_models" / "checkpoints" / "parameter_transfer"
    assert [p.name for p in checkpoints.iterdir()] == ["last.pt"]


def started_kedro_run(project: Path, log: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kedro", "run", *args],
        cwd=project, env=kedro_environment(), stdout=log.open("w"), stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_two_runs_started_at_once_both_finish_with_intact_outputs(default_run):
    """Two `kedro run`s of the same pipeline at once in one project: both extract the same
    (uncached) features into the shared cache, log to the one SQLite MLflow database and
    register the same model name."""
    from transfer_learning.datasets import load_arrays
    from transfer_learning.packaging import load_image_model, local_image_classifier

    project, _ = default_run
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("transfer_learning")
    registered = "name='transfer_learning_feature_transfer'"
    folders = {
        "models": project / "data" / "06_models" / "feature_transfer" / "image_model",
        "features": project / "data" / "04_feature" / "image_features.npz",
        "cache": project / "data" / "04_feature" / "cache",
    }
    before = {name: set(folder.iterdir()) for name, folder in folders.items()}
    runs_before = {run.info.run_id for run in client.search_runs([experiment.experiment_id])}
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

    new_runs = [
        run
        for run in client.search_runs([experiment.experiment_id])
        if run.info.run_id not in runs_before
    ]
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


def latest_run(project: Path):
    """The latest `kedro run`'s MLflow run (not one of its child runs)."""
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("transfer_learning")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    return next(run for run in runs if "mlflow.parentRunId" not in run.data.tags)


def test_backbone_selection_ranks_and_auto_backbone_uses_its_pick(default_run):
    project, _ = default_run
    sample = "--params=selection.max_images=200"
    completed = kedro(project, "--pipelines=backbone_selection", sample)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    reporting = project / "data" / "08_reporting"
    (saved,) = (reporting / "backbone_ranking.csv").glob("*/backbone_ranking.csv")
    ranking = pd.read_csv(saved)
    # 8 px digits: the three offline networks at 48 px, and their random-weight controls.
    assert sorted(ranking["candidate"]) == sorted(
        f"efficientnet_lite{v}@48{suffix}" for v in (0, 1, 2) for suffix in ("", " (random)")
    )
    assert ranking["pretrained"].tolist() == [True] * 3 + [False] * 3
    pick = json.loads((reporting / "backbone_recommendation.json").read_text())
    assert pick["name"] == ranking["name"].iloc[0] and pick["image_size"] == 48
    report = (reporting / "backbone_ranking.md").read_text()
    assert f"Recommended: **{pick['name']} at 48 px**" in report and "kendall_tau" in report
    assert (reporting / "backbone_ranking.png").stat().st_size > 0
    selection_run = latest_run(project)
    assert "backbone_selection.logme.kendall_tau" in selection_run.data.metrics

    completed = kedro(project, "--pipelines=feature_transfer", f"{sample},backbone.name=auto")
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    params = latest_run(project).data.params
    assert params["backbone.resolved.name"] == pick["name"]
    assert "backbone_ranking" in params["backbone.resolved.reason"]
    metrics = json.loads((reporting / "feature_transfer_metrics.json").read_text())
    assert metrics["accuracy"] > 0.8


def test_viz_build_shows_every_pipeline_in_layers(default_run):
    project, _ = default_run
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"}
    completed = subprocess.run(
        [sys.executable, "-m", "kedro", "viz", "build"],
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


def test_notebook_runs_top_to_bottom(default_run):
    import nbformat
    from nbclient import NotebookClient

    project, _ = default_run
    notebook = nbformat.read(PROJECT_ROOT / "notebooks" / "compare_strategies.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(project)}}
    ).execute()
    outputs = [
        o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
    ]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    # A confusion matrix and a reliability diagram per strategy.
    assert len(images) == 2 * len(STRATEGY_NAMES)


def noisy_digit_folders(folder: Path, per_class: int = 15) -> Path:
    """Real digits under heavy pixel noise, in class folders: a target domain with labels."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    for digit in range(10):
        for i in np.flatnonzero(digits.target == digit)[-per_class:]:
            pixels = np.clip(digits.images[i] * 16 + rng.normal(0, 60, (8, 8)), 0, 255)
            (folder / str(digit)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / str(digit) / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def adaptation_run(tmp_path_factory):
    project = copy_project(tmp_path_factory.mktemp("adaptation"))
    target = noisy_digit_folders(tmp_path_factory.mktemp("noisy_digits"))
    completed = kedro(
        project, "--pipelines=domain_adaptation", f"--params=data.target_path={target}"
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return project, target


def test_domain_adaptation_run_reports_saves_and_registers_every_method(adaptation_run):
    project, target = adaptation_run
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
    assert (reports / "domain_adaptation.png").stat().st_size > 0
    assert "## How different are the domains?" in (reports / "domain_adaptation.md").read_text()
    listing = json.loads(
        next(
            (project / "data" / "06_models" / "adapted_image_models.json").glob("*/*.json")
        ).read_text()
    )
    assert len(listing["models"]) == 5
    for name in listing["models"]:
        saved = project / "data" / "06_models" / name / "image_model" / listing["version"]
        assert (saved / "image_model" / "MLmodel").exists(), name
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    registered = {m.name for m in client.search_registered_models()}
    assert {f"transfer_learning_{name}" for name in listing["models"]} <= registered


def test_predict_uses_an_adapted_model(adaptation_run, tmp_path):
    project, target = adaptation_run
    predictions = predict_with(project, target / "3", "parameter_transfer_adabn")
    assert len(predictions) == 15 and (predictions["error"].isna()).all()


def test_learning_curve_run_reports_every_point_as_an_mlflow_child_run(default_run):
    project, _ = default_run
    # Lists cannot be given with --params (it splits on commas): a user sets them in conf/local.
    (project / "conf" / "local" / "parameters_learning_curve.yml").write_text(
        "curve:\n  per_class: [1, 3]\n  repeats: 2\n"
        "  strategies: [feature_transfer, parameter_transfer]\n"
    )
    try:
        completed = kedro(
            project,
            "--pipelines=learning_curve",
            "--params=finetune.steps=5,head.selection=val,training.progress=false",
        )
    finally:
        (project / "conf" / "local" / "parameters_learning_curve.yml").unlink()
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "(cached)" in completed.stdout + completed.stderr  # features of the default run
    reports = project / "data" / "08_reporting"
    curve = pd.read_csv(reports / "learning_curve.csv")
    assert len(curve) == 2 * 2 * 2
    assert set(curve["strategy"]) == {"feature_transfer", "parameter_transfer"}
    assert set(curve["per_class"].astype(str)) == {"1", "3"} and set(curve["seed"]) == {42, 43}
    assert curve["accuracy"].between(0.1, 1).all()  # ten digit classes: better than chance
    ones = curve[curve["per_class"].astype(str) == "1"]
    assert (ones.loc[ones["strategy"] == "feature_transfer", "head"] == "prototype").all()
    report = (reports / "learning_curve.md").read_text()
    assert "| feature_transfer | 1 | 1.0 | 2 |" in report
    assert (reports / "learning_curve.png").stat().st_size > 0
    parent = latest_run(project)
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == len(curve)
    assert {(c.data.params["strategy"], c.data.params["per_class"]) for c in children} == {
        (strategy, size) for strategy in ("feature_transfer", "parameter_transfer") for size in "13"
    }
    artefacts = {a.path for a in client.list_artifacts(parent.info.run_id, "learning_curve")}
    assert "learning_curve/learning_curve.csv" in artefacts


# ---- Airflow: the generated DAGs, run by a real Airflow (`make airflow` builds .venv-airflow) ----

AIRFLOW_PYTHON = PROJECT_ROOT / ".venv-airflow" / "bin" / "python"
AIRFLOW_PIPELINES = [
    "__default__",
    "feature_transfer",
    "parameter_transfer",
    "structure_transfer",
    "predict",
]
CONF_ARCHIVE = PROJECT_ROOT / "dist" / "conf-transfer_learning.tar.gz"


@pytest.fixture(scope="module")
def airflow_dags(tmp_path_factory) -> Path:
    """The DAGs as `make airflow-dags` writes them, with a 2 s retry delay for the tests."""
    if not AIRFLOW_PYTHON.exists() or not CONF_ARCHIVE.exists():
        pytest.fail("No Airflow environment: run `make airflow` (make test does) first.")
    folder = tmp_path_factory.mktemp("dags")
    completed = subprocess.run(
        [sys.executable, "-m", "kedro", "airflow", "create", "--env", "airflow", "--group-by",
         "memory", "--jinja-file", "deploy/airflow_dag_template.j2", "--target-dir", str(folder),
         "--pipelines", ",".join(AIRFLOW_PIPELINES), "--params", "retry_delay_seconds=2"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "true"},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    return folder


def airflow_env(dags: Path, project: Path, conf_source: Path = CONF_ARCHIVE) -> dict[str, str]:
    """Airflow's settings for a local instance on `dags`, with tasks working in `project`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AIRFLOW"))}
    env.update(
        AIRFLOW_HOME=str(project / "airflow_home"),
        AIRFLOW__CORE__DAGS_FOLDER=str(dags),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        TRANSFER_LEARNING_PROJECT_PATH=str(project),
        TRANSFER_LEARNING_CONF_SOURCE=str(conf_source),
        KEDRO_DISABLE_TELEMETRY="true",
        PATH=os.pathsep.join([str(AIRFLOW_PYTHON.parent), env.get("PATH", "")]),
    )
    return env


def airflow(dags: Path, project: Path, *args: str, timeout: int = 900):
    """Run Airflow's Python in its own environment (see `airflow_env`)."""
    return subprocess.run(
        [str(AIRFLOW_PYTHON), *args], cwd=project, env=airflow_env(dags, project),
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def kedro_task_graph(pipeline_name: str) -> set[tuple[str, str]]:
    """The edges the DAG must have: Kedro's node groups (`--group-by memory` in the airflow
    environment) and their dependencies, plus the MLflow run that comes first."""
    from kedro.framework.project import pipelines
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project
    from kedro_airflow.grouping import group_memory_nodes
    from slugify import slugify

    bootstrap_project(PROJECT_ROOT)
    with KedroSession.create(project_path=PROJECT_ROOT, env="airflow") as session:
        catalog = session.load_context().catalog
    groups = group_memory_nodes(catalog, pipelines[pipeline_name])
    edges = {("start_mlflow_run", slugify(group.name)) for group in groups}
    edges |= {(slugify(dep), slugify(group.name)) for group in groups for dep in group.dependencies}
    return edges


def test_every_generated_dag_imports_and_has_kedros_graph(airflow_dags, tmp_path):
    script = """
import json, os
from airflow.models import DagBag
bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
print(json.dumps({
    "errors": {str(k): str(v) for k, v in bag.import_errors.items()},
    "dags": {dag_id: sorted([up, task.task_id] for task in dag.tasks for up in task.upstream_task_ids)
             for dag_id, dag in bag.dags.items()},
}))
"""
    completed = airflow(airflow_dags, tmp_path, "-c", script)
    assert completed.returncode == 0, completed.stderr[-3000:]
    found = json.loads(completed.stdout.strip().splitlines()[-1])
    assert found["errors"] == {}
    expected_ids = {
        f"transfer-learning-{name.strip('_').replace('_', '-')}" for name in AIRFLOW_PIPELINES
    }
    assert set(found["dags"]) == expected_ids
    for name in AIRFLOW_PIPELINES:
        dag_id = f"transfer-learning-{name.strip('_').replace('_', '-')}"
        assert {tuple(edge) for edge in found["dags"][dag_id]} == kedro_task_graph(name), name
    # The resolved backbone is persisted: extraction and each training are tasks of their own.
    assert [
        "extract-image-features",
        "feature-transfer-split-features-feature-transfer-fit-head",
    ] in (found["dags"]["transfer-learning-feature-transfer"])


def test_feature_transfer_dag_run_is_one_mlflow_run_with_the_kedro_runs_metrics(
    default_run, airflow_dags, tmp_path
):
    project, _ = default_run
    workdir = copy_project(tmp_path / "airflow_project")
    migrated = airflow(airflow_dags, workdir, "-m", "airflow", "db", "migrate")
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    completed = airflow(
        airflow_dags, workdir, "-m", "airflow", "dags", "test", "transfer-learning-feature-transfer"
    )
    (tmp_path / "dags_test.log").write_text(completed.stdout + completed.stderr)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert re.search(r"DagRun Finished: .* state=success", completed.stdout + completed.stderr)
    reports = workdir / "data" / "08_reporting"
    by_airflow = json.loads((reports / "feature_transfer_metrics.json").read_text())
    by_kedro = json.loads(
        (project / "default_run_reports" / "feature_transfer_metrics.json").read_text()
    )
    for metric in ("accuracy", "balanced_accuracy", "macro_f1", "log_loss", "ece"):
        assert by_airflow[metric] == pytest.approx(by_kedro[metric], abs=1e-9), metric
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("transfer_learning")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # every task of the DAG run logged into the same run
    run = runs[0]
    assert run.data.tags["airflow.dag_id"] == "transfer-learning-feature-transfer"
    assert run.data.tags["airflow.run_id"].startswith("manual__")
    assert run.data.metrics["feature_transfer.accuracy"] == pytest.approx(by_airflow["accuracy"])
    assert "extraction.images_per_second" in run.data.metrics  # from an earlier task


TRY_NUMBERS = """
from airflow.models.taskinstance import TaskInstance
from airflow.utils.session import create_session
with create_session() as session:
    for ti in session.query(TaskInstance).all():
        print(ti.task_id, ti.try_number, ti.state)
"""


def test_a_task_that_fails_is_retried_alone_and_the_run_completes(airflow_dags, tmp_path):
    """The images are not there yet: index-images fails, is retried once they arrive, and the
    task that had finished (the MLflow run) is not run again."""
    import threading
    import time

    workdir = copy_project(tmp_path / "airflow_project")
    images = tmp_path / "landing"
    (workdir / "conf" / "airflow" / "parameters.yml").write_text(
        f"data:\n  source: imagefolder\n  path: {images}\n"
    )
    env = airflow_env(airflow_dags, workdir, conf_source=workdir / "conf")
    env["PYTHONUNBUFFERED"] = "1"  # the log is watched while it is written
    migrated = subprocess.run(
        [str(AIRFLOW_PYTHON), "-m", "airflow", "db", "migrate"], cwd=workdir, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    log = tmp_path / "dags_test.log"
    with open(log, "w") as stream:
        run = subprocess.Popen(
            [str(AIRFLOW_PYTHON), "-m", "airflow", "dags", "test", "transfer-learning-feature-transfer"],
            cwd=workdir, env=env, stdout=stream, stderr=subprocess.STDOUT,
        )  # fmt: skip

        def deliver_images_after_the_first_failure() -> None:
            while "up_for_retry" not in log.read_text() and run.poll() is None:
                time.sleep(0.2)
            noisy_digit_folders(images, per_class=8)

        threading.Thread(target=deliver_images_after_the_first_failure, daemon=True).start()
        assert run.wait(timeout=900) == 0, log.read_text()[-3000:]
    assert re.search(r"DagRun Finished: .* state=success", log.read_text())
    tries = subprocess.run(
        [str(AIRFLOW_PYTHON), "-c", TRY_NUMBERS], cwd=workdir, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert tries.returncode == 0, tries.stderr[-3000:]
    by_task = {line.split()[0]: line.split()[1:] for line in tries.stdout.strip().splitlines()}
    assert by_task["start_mlflow_run"] == ["1", "success"]  # not recomputed
    assert by_task["index-images"] == ["2", "success"]  # failed once, retried
    assert by_task["feature-transfer-evaluate-test-predictions"] == ["1", "success"]
    metrics = json.loads(
        (workdir / "data" / "08_reporting" / "feature_transfer_metrics.json").read_text()
    )
    assert metrics["n_test"] == 16  # 80 images, a fifth of them the test split
