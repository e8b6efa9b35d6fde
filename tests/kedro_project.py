"""Helpers of the end-to-end tests: a temporary copy of the project, `kedro run` in it as a user
runs it (a subprocess, offline on CPU), its MLflow runs and versioned outputs, and small real
image folders to feed it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient
from PIL import Image
from sklearn.datasets import load_digits

from tests.conftest import PROJECT_ROOT

DATA_LAYERS = ("01_raw", "02_intermediate", "04_feature", "06_models", "07_model_output")


def copy_project(target: Path) -> Path:
    """The project's code and configuration in `target`, with an empty conf/local and data/."""
    for name in ("conf", "src", "pyproject.toml", ".telemetry"):
        source = PROJECT_ROOT / name
        if source.is_dir():
            ignore = shutil.ignore_patterns("local", "__pycache__", "*.egg-info")
            shutil.copytree(source, target / name, ignore=ignore)
        else:
            shutil.copy(source, target / name)
    (target / "conf" / "local").mkdir()
    for layer in (*DATA_LAYERS, "08_reporting"):
        (target / "data" / layer).mkdir(parents=True)
    return target


def kedro_environment() -> dict[str, str]:
    """This environment without MLflow settings (the project's own apply), telemetry off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(KEDRO_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
    return env


def kedro(project: Path, *args: str) -> subprocess.CompletedProcess:
    """`kedro run *args` in `project`, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "kedro", "run", *args],
        cwd=project, env=kedro_environment(), capture_output=True, text=True, timeout=900,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def succeeded(completed: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """`completed`, after asserting that it exited 0 (its output's end is the message)."""
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed


def started_kedro_run(project: Path, log: Path, *args: str) -> subprocess.Popen:
    """`kedro run *args` in the background, its output in `log`."""
    return subprocess.Popen(
        [sys.executable, "-m", "kedro", "run", *args],
        cwd=project, env=kedro_environment(), stdout=log.open("w"), stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def predict_with(project: Path, folder: Path, strategy: str) -> pd.DataFrame:
    """`kedro run --pipelines=predict` on `folder` with `strategy`'s model; its predictions.csv."""
    succeeded(
        kedro(
            project,
            "--pipelines=predict",
            f"--params=predict.path={folder},predict.strategy={strategy}",
        )
    )
    return pd.read_csv(project / "data" / "07_model_output" / "predictions.csv")


def run_python(script: str, cwd: Path, *args: str) -> str:
    """A Python script in a fresh process (as a user's own program); its standard output."""
    completed = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=cwd, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def mlflow_client(project: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def kedro_runs(project: Path) -> list:
    """The project's MLflow runs of `kedro run`s (not their child runs), newest first."""
    client = mlflow_client(project)
    experiment = client.get_experiment_by_name("transfer_learning")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    return [run for run in runs if "mlflow.parentRunId" not in run.data.tags]


def latest_run(project: Path):
    """The latest `kedro run`'s MLflow run (not one of its child runs)."""
    return kedro_runs(project)[0]


def versions(folder: Path) -> set[str]:
    """The versions a versioned dataset's folder holds (empty when there is none yet)."""
    return {path.name for path in folder.iterdir()} if folder.is_dir() else set()


def offline_env() -> dict[str, str]:
    # This machine has no route to the internet anyway; the proxy makes that fail fast everywhere.
    return {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "NO_PROXY": ""}


def digit_images(folder: Path, count: int = 6) -> list[tuple[Path, str]]:
    """Real handwritten digits from scikit-learn, written as PNG files of another size."""
    digits = load_digits()
    written = []
    for i in range(count):
        path = folder / "nested" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels).resize((24, 24)).save(path)
        written.append((path, str(digits.target[i])))
    return written


def noisy_digit_folders(folder: Path, per_class: int = 15) -> Path:
    """Real digits under heavy pixel noise, in class folders: a target domain with labels."""
    digits = load_digits()
    rng = np.random.default_rng(0)
    for digit in range(10):
        for i in np.flatnonzero(digits.target == digit)[-per_class:]:
            pixels = np.clip(digits.images[i] * 16 + rng.normal(0, 60, (8, 8)), 0, 255)
            (folder / str(digit)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / str(digit) / f"{i}.png")
    return folder
