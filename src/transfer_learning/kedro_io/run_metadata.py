"""What every MLflow run says about itself, so that a week of runs on several data sets stays
readable in the MLflow UI:

- the experiment's kind, `custom_model_development`: MLflow 3 otherwise infers a kind and may
  open the experiment on its GenAI view (traces, token usage) instead of the training runs;
- the images the run used, as MLflow datasets, one per split (`train`, `val`, `test`; with
  data.on_label_issue=drop also `dropped`; the domain to adapt to as `target_<split>`; a
  predict run's folder as `predict`): named after the data, sourced at its folder or manifest,
  with the data fingerprint as digest, so the runs table's Dataset column tells runs on
  different images apart;
- a run name `<pipeline> · <data name>` and tags `data.name`, `data.fingerprint`, `kedro.env`,
  `transfer_learning.version` and, in a git checkout, MLflow's `mlflow.source.git.commit`.

kedro-mlflow starts the run in its own `before_pipeline_run`; these hooks run after it.
"""

from __future__ import annotations

import subprocess
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pandas as pd
from kedro.framework.hooks import hook_impl
from kedro.io import DatasetError

from transfer_learning.data.index import data_fingerprint
from transfer_learning.data.settings import DataSettings

EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# The MLflow contexts of an index's splits: `train`, … for the data, `target_train`, … for the
# domain to adapt to (a predict run's images are one context, `predict`).
CONTEXT_PREFIX = {"image_index": "", "target_index": "target_"}
DATASET_COLUMNS = ["location", "label", "class_name", "split"]


class RunMetadataHooks:
    """Sets the experiment kind, the run's name and tags, and logs the images it used."""

    def __init__(self) -> None:
        self._env = "local"
        self._project_path: Path | None = None
        self._sources: dict[str, tuple[str, str]] = {}
        self._logged: set[str] = set()

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        self._env = context.env or "local"
        self._project_path = Path(context.project_path)

    @hook_impl(trylast=True)  # after kedro-mlflow's hook has started the run
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        import mlflow

        self._logged = set()
        self._sources = image_sources(catalog)
        run = mlflow.active_run()
        if run is None:
            return  # tracking is off for this pipeline
        client = mlflow.MlflowClient()
        for key, value in EXPERIMENT_KIND.items():
            client.set_experiment_tag(run.info.experiment_id, key, value)
        pipelines = "+".join(run_params.get("pipeline_names") or ["__default__"])
        tags = {"kedro.env": self._env, "transfer_learning.version": project_version()}
        commit = git_commit(self._project_path)
        if commit is not None:
            tags["mlflow.source.git.commit"] = commit
        # Named after the images it works on: a predict run's are the folder it labels.
        used = pipeline.datasets()
        for dataset in ("image_index", "images_to_label"):
            if dataset in used and dataset in self._sources:
                tags["data.name"] = self._sources[dataset][0]
                tags["mlflow.runName"] = f"{pipelines} · {tags['data.name']}"
                break
        mlflow.set_tags(tags)

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node: Any) -> None:
        self._log_images(dataset_name, data)

    @hook_impl
    def after_dataset_loaded(self, dataset_name: str, data: Any, node: Any) -> None:
        self._log_images(dataset_name, data)

    def _log_images(self, dataset_name: str, table: Any) -> None:
        import mlflow

        if (
            dataset_name not in self._sources
            or dataset_name in self._logged
            or not isinstance(table, pd.DataFrame)
            or mlflow.active_run() is None
        ):
            return
        self._logged.add(dataset_name)
        name, origin = self._sources[dataset_name]
        if dataset_name == "images_to_label":
            rows = pd.DataFrame({"location": table["path"], "label": -1, "split": "predict"})
            log_input(rows, name, origin, "predict")
            return
        if dataset_name == "image_index":
            mlflow.set_tag("data.fingerprint", data_fingerprint(table))
        for split, rows in table.groupby("split", sort=False):
            rows = rows[DATASET_COLUMNS].reset_index(drop=True)
            log_input(rows, name, origin, CONTEXT_PREFIX[dataset_name] + split)


def image_sources(catalog: Any) -> dict[str, tuple[str, str]]:
    """Image table in the catalog → (the data's name, where its images are) for this run."""
    sources = {}
    data = _parameters(catalog, "data")
    try:
        data = None if data is None else DataSettings.from_params(data)
    except ValueError:
        data = None  # the pipeline's own first node says what is wrong with `data`
    if data is not None:
        sources["image_index"] = (data.data_name(), data.origin())
        if data.target_path:
            target = Path(data.target_path).resolve()
            sources["target_index"] = (target.name, str(target))
    predict_path = (_parameters(catalog, "predict") or {}).get("path")
    if predict_path:
        folder = Path(predict_path).resolve()
        sources["images_to_label"] = (folder.name, str(folder))
    return sources


def _parameters(catalog: Any, block: str) -> dict[str, Any] | None:
    try:
        return catalog.load(f"params:{block}") or {}
    except DatasetError:
        return None  # not in this catalog


def log_input(rows: pd.DataFrame, name: str, origin: str, context: str) -> None:
    """One split of the index as an MLflow dataset of the active run."""
    import mlflow

    with warnings.catch_warnings():
        # MLflow registers its local-file source twice and warns on every path it resolves.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        dataset = mlflow.data.from_pandas(
            rows, source=origin, name=name, digest=data_fingerprint(rows)
        )
    mlflow.log_input(dataset, context=context)


def project_version() -> str:
    """The installed project's version (a source checkout without install: unknown)."""
    try:
        return version("transfer_learning")
    except PackageNotFoundError:
        return "unknown"


def git_commit(project_path: Path | None) -> str | None:
    """The checked-out commit of the project, when it is a git checkout and git is installed."""
    if project_path is None or not (project_path / ".git").exists():
        return None
    try:
        completed = subprocess.run(
            ["git", "-C", str(project_path), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip() or None
