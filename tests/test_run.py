"""`kedro run` as a user runs it, in a temporary copy of the project, offline on CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import PROJECT_ROOT


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


def kedro(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(KEDRO_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "kedro", "run", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    project = copy_project(tmp_path_factory.mktemp("project"))
    completed = kedro(project)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
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
    assert run.data.params["structure_transfer.finetune.init"] == "random"
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
    for strategy in ("feature_transfer", "parameter_transfer", "structure_transfer"):
        metrics = json.loads((reports / f"{strategy}_metrics.json").read_text())
        assert metrics["strategy"] == strategy and metrics["n_test"] == 360
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "ece", "fit_seconds"):
            assert key in metrics
    comparison = (reports / "comparison.md").read_text()
    for strategy in ("feature_transfer", "parameter_transfer", "structure_transfer"):
        assert f"| {strategy} |" in comparison
    assert (reports / "comparison.png").stat().st_size > 0
    assert list((project / "data" / "06_models" / "parameter_transfer" / "model.pt").glob("*/model.pt"))
