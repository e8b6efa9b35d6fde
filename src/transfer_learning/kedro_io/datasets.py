"""Kedro datasets this project needs beyond kedro-datasets: versioned, atomically written files."""

from __future__ import annotations

import json
import logging
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
from kedro.io import AbstractDataset, AbstractVersionedDataset, DatasetError, Version
from kedro_datasets._typing import HTMLPreview, TablePreview  # kedro-viz's preview types
from kedro_datasets.text import TextDataset

from transfer_learning.core.files import load_arrays, save_arrays, write_atomically

logger = logging.getLogger(__name__)


class _VersionedFile(AbstractVersionedDataset):
    """One local file per version; subclasses say how to read and write it."""

    def __init__(
        self,
        filepath: str,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(PurePosixPath(filepath), version)
        self.metadata = metadata  # e.g. the kedro-viz layer

    def _exists(self) -> bool:
        return Path(self._get_load_path()).exists()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "version": self._version}


class ArraysDataset(_VersionedFile):
    """A dict of named numpy arrays in one versioned, atomically written .npz file."""

    def load(self) -> dict[str, np.ndarray]:
        return load_arrays(Path(self._get_load_path()))

    def save(self, data: dict[str, np.ndarray]) -> None:
        save_arrays(Path(self._get_save_path()), data)


class TorchCheckpointDataset(_VersionedFile):
    """A dict of tensors and plain values (a model checkpoint), versioned and written atomically.

    Loaded with ``torch.load(weights_only=True)``: a checkpoint file can never run code on load.
    """

    def load(self) -> dict[str, Any]:
        import torch

        return torch.load(Path(self._get_load_path()), map_location="cpu", weights_only=True)

    def save(self, data: dict[str, Any]) -> None:
        import torch

        write_atomically(Path(self._get_save_path()), lambda stream: torch.save(data, stream))


class MlflowParamsDataset(AbstractDataset):
    """Logs a dict as MLflow parameters `<prefix>.<key>` of the active run (write only).

    For values known only at run time, such as what an `auto` setting resolved to.
    """

    def __init__(self, prefix: str, metadata: dict[str, Any] | None = None) -> None:
        self.prefix = prefix
        self.metadata = metadata

    def load(self) -> dict[str, Any]:
        raise DatasetError(f"{self.prefix} parameters are logged to MLflow, not read back.")

    def save(self, data: dict[str, Any]) -> None:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.log_params({f"{self.prefix}.{key}": value for key, value in data.items()})

    def _describe(self) -> dict[str, Any]:
        return {"prefix": self.prefix}


class MlflowTagsDataset(AbstractDataset):
    """Sets a dict as tags `<prefix>.<key>` of the active MLflow run (write only): what a run
    concluded, searchable in the runs table (e.g. the recommended strategy)."""

    def __init__(self, prefix: str, metadata: dict[str, Any] | None = None) -> None:
        self.prefix = prefix
        self.metadata = metadata

    def load(self) -> dict[str, str]:
        raise DatasetError(f"{self.prefix} tags are set on the MLflow run, not read back.")

    def save(self, data: dict[str, str]) -> None:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.set_tags({f"{self.prefix}.{key}": str(value) for key, value in data.items()})

    def _describe(self) -> dict[str, Any]:
        return {"prefix": self.prefix}


class MlflowChildRunsDataset(AbstractDataset):
    """Logs each row of a table as a child run of the active MLflow run (write only).

    `params` columns become the child's parameters and `metrics` columns its metrics; the run
    name is built from the parameter values. A learning curve is one parent run (the `kedro run`)
    with one child per point, which the MLflow UI shows nested and can compare side by side.
    """

    def __init__(
        self, params: list[str], metrics: list[str], metadata: dict[str, Any] | None = None
    ) -> None:
        self.params, self.metrics, self.metadata = list(params), list(metrics), metadata

    def load(self) -> pd.DataFrame:
        raise DatasetError("Child runs are logged to MLflow, not read back.")

    def save(self, data: pd.DataFrame) -> None:
        import mlflow

        parent = mlflow.active_run()
        if parent is None:
            return  # tracking is off for this run
        for row in data.to_dict(orient="records"):
            params = {name: row[name] for name in self.params}
            with mlflow.start_run(
                run_name="-".join(str(value) for value in params.values()),
                experiment_id=parent.info.experiment_id,  # else the current default experiment
                nested=True,
            ):
                mlflow.log_params(params)
                mlflow.log_metrics({name: float(row[name]) for name in self.metrics})

    def _describe(self) -> dict[str, Any]:
        return {"params": self.params, "metrics": self.metrics}


class MarkdownDataset(TextDataset):
    """A Markdown report (a text file) that kedro-viz previews rendered, as HTML; raw HTML in
    the text is escaped, so names from the user's data cannot inject markup."""

    def preview(self) -> HTMLPreview:
        from markdown_it import MarkdownIt

        renderer = MarkdownIt("commonmark", {"html": False}).enable("table")
        return HTMLPreview(renderer.render(self.load()))


class TableDataset(_VersionedFile):
    """A pandas table in one versioned, atomically written CSV file.

    With `missing_ok`, loading before anything was saved gives None instead of an error: for
    inputs that are optional, such as the backbone ranking `backbone.name: auto` reads. With
    `artifact_path`, each saved version is also logged to the active MLflow run there
    (kedro-mlflow's artefact wrapper would give the file a save version of its own, which the
    catalog refuses).
    """

    def __init__(
        self,
        filepath: str,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
        missing_ok: bool = False,
        artifact_path: str | None = None,
    ) -> None:
        super().__init__(filepath, version, metadata)
        self.missing_ok = missing_ok
        self.artifact_path = artifact_path

    def load(self) -> pd.DataFrame | None:
        if self.missing_ok and not self.exists():
            return None
        return pd.read_csv(self._get_load_path())

    def preview(self, nrows: int = 10) -> TablePreview:
        """The first rows, as kedro-viz shows a table (empty cells as null, not NaN)."""
        head = pd.read_csv(self._get_load_path(), nrows=nrows)
        return TablePreview(head.astype(object).where(head.notna(), None).to_dict(orient="split"))

    def save(self, data: pd.DataFrame) -> None:
        path = Path(self._get_save_path())
        write_atomically(path, lambda stream: stream.write(data.to_csv(index=False).encode()))
        if self.artifact_path is not None:
            import mlflow

            if mlflow.active_run() is not None:
                mlflow.log_artifact(str(path), self.artifact_path)


class HeadDataset(_VersionedFile):
    """A fitted scikit-learn head as a versioned skops file: it loads with scikit-learn's and the
    project's types only, so a replaced file cannot run code (see `packaging.load_head`)."""

    def load(self) -> Any:
        from transfer_learning.serving.packaging import load_head

        return load_head(Path(self._get_load_path()))

    def save(self, data: Any) -> None:
        from transfer_learning.serving.packaging import head_bytes

        content = head_bytes(data)
        write_atomically(Path(self._get_save_path()), lambda stream: stream.write(content))


class ImageModelDataset(_VersionedFile):
    """A deployable `ImageClassifier` as a versioned MLflow pyfunc folder
    (`<filepath>/<version>/<name>`), packaged so that loading it runs no pickle (see
    `transfer_learning.serving.packaging`). Loads as MLflow's PyFuncModel, like `mlflow.pyfunc.load_model`.

    `code_paths`: source folders copied into the model (the project's package, for a model served
    where the project is not installed).
    """

    def __init__(
        self,
        filepath: str,
        code_paths: list[str] | None = None,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(filepath, version, metadata)
        self.code_paths = code_paths

    def load(self) -> Any:
        from transfer_learning.serving.packaging import load_image_model

        return load_image_model(Path(self._get_load_path()).resolve())

    def save(self, data: Any) -> None:
        from transfer_learning.serving.packaging import local_image_classifier, save_image_model

        save_image_model(
            local_image_classifier(data), Path(self._get_save_path()).resolve(), self.code_paths
        )


class RegisteredImageModelDataset(AbstractDataset):
    """Logs a deployable `ImageClassifier` to the active MLflow run as `name`, packaged as
    `ImageModelDataset` packages it, and registers it as `registered_model_name` (write only)."""

    def __init__(
        self,
        name: str,
        registered_model_name: str | None = None,
        code_paths: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.name, self.registered_model_name = name, registered_model_name
        self.code_paths = code_paths
        self.metadata = metadata

    def load(self) -> Any:
        raise DatasetError("Registered models are read from the MLflow model registry.")

    def save(self, data: Any) -> None:
        import mlflow

        from transfer_learning.serving.packaging import local_image_classifier, log_image_model

        if mlflow.active_run() is None:
            return  # tracking is off for this run
        log_image_model(
            local_image_classifier(data), self.name, self.registered_model_name, self.code_paths
        )

    def _describe(self) -> dict[str, Any]:
        return {"name": self.name, "registered_model_name": self.registered_model_name}


class ChampionModelDataset(AbstractDataset):
    """Registers the comparison's choice as `registered_model_name` (one registered model for
    the project) with the alias `champion`, so that `models:/transfer_learning@champion` serves
    it; every compared strategy's registered version gets its test figures as description
    (write only).

    Saved: {"strategy": the champion, "strategies": name → that strategy's comparison figures}.
    Each strategy's version is the one the active run registered (a run that only compares: the
    latest), under `strategy_model_name` with `{strategy}` filled in.
    """

    def __init__(
        self,
        registered_model_name: str,
        strategy_model_name: str,
        alias: str = "champion",
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.registered_model_name = registered_model_name
        self.strategy_model_name = strategy_model_name
        self.alias = alias
        self.metadata = metadata

    def load(self) -> Any:
        raise DatasetError("The champion is read from the MLflow model registry.")

    def save(self, data: dict[str, Any]) -> None:
        import mlflow
        from mlflow.exceptions import MlflowException

        run = mlflow.active_run()
        if run is None:
            return  # tracking is off for this run
        run = mlflow.get_run(run.info.run_id)  # with the tags set since it started
        client = mlflow.MlflowClient()
        data_name = run.data.tags.get("data.name", "")
        versions = {}
        for strategy, figures in data["strategies"].items():
            version = self._strategy_version(client, strategy, run.info.run_id)
            if version is None:
                continue
            versions[strategy] = version
            client.update_model_version(
                version.name, version.version, version_description(strategy, data_name, figures)
            )
        champion = versions.get(data["strategy"])
        if champion is None:
            logger.warning(
                "No registered model of %s to make %s@%s",
                data["strategy"],
                self.registered_model_name,
                self.alias,
            )
            return
        try:
            client.create_registered_model(self.registered_model_name)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        registered = client.create_model_version(
            self.registered_model_name,
            champion.source,
            run_id=champion.run_id,
            tags={**champion.tags, "chosen_because": data.get("reason", "")[:5000]},
            description=champion.description,
        )
        client.set_registered_model_alias(
            self.registered_model_name, self.alias, registered.version
        )
        logger.info(
            "%s@%s is now version %s (%s)",
            self.registered_model_name,
            self.alias,
            registered.version,
            data["strategy"],
        )

    def _strategy_version(self, client: Any, strategy: str, run_id: str) -> Any:
        name = self.strategy_model_name.format(strategy=strategy)
        found = client.search_model_versions(f"name = '{name}'")
        ours = [v for v in found if v.run_id == run_id] or found
        return max(ours, key=lambda v: int(v.version)) if ours else None

    def _describe(self) -> dict[str, Any]:
        return {"registered_model_name": self.registered_model_name, "alias": self.alias}


def version_description(strategy: str, data_name: str, figures: dict[str, Any]) -> str:
    """A registered version in one line: which strategy, on what, how accurate on test."""
    on = f" on {data_name}" if data_name else ""
    parts = [f"test accuracy {figures['accuracy'] * 100:.1f} %"]
    if "accuracy_interval" in figures:
        low, high = figures["accuracy_interval"]
        parts[0] += f" [{low * 100:.1f}, {high * 100:.1f}]"
    if "n_test" in figures:
        parts[0] += f" on {figures['n_test']} images"
    if "balanced_accuracy" in figures:
        parts.append(f"balanced accuracy {figures['balanced_accuracy'] * 100:.1f} %")
    if "ece" in figures:
        parts.append(f"ECE {figures['ece']:.3f}")
    return f"{strategy}{on}: {', '.join(parts)}."


class ImageModelsDataset(_VersionedFile):
    """Several deployable image models (a dict name → `ImageClassifier`), each saved where and
    as a strategy's `image_model` is — `<folder>/<name>/image_model/<version>/image_model` —
    all under this dataset's version, so `predict.strategy=<name>` and
    `--load-versions=predict_model:<version>` find them like any strategy's model.

    `filepath` is the versioned JSON list of the names a version holds; loading gives the models
    of the latest (or the pinned) version.
    """

    def __init__(
        self,
        filepath: str,
        folder: str,
        code_paths: list[str] | None = None,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(filepath, version, metadata)
        self.folder = folder
        self.code_paths = code_paths

    def _model_dataset(self, name: str, version: Version) -> ImageModelDataset:
        return ImageModelDataset(
            str(Path(self.folder) / name / "image_model"), self.code_paths, version
        )

    def load(self) -> dict[str, Any]:
        manifest = json.loads(Path(self._get_load_path()).read_text())
        return {
            name: self._model_dataset(name, Version(manifest["version"], None)).load()
            for name in manifest["models"]
        }

    def save(self, data: dict[str, Any]) -> None:
        version = self.resolve_save_version()
        for name, model in data.items():
            self._model_dataset(name, Version(None, version)).save(model)
        # Written last: a run that fails half-way leaves no list naming missing models.
        manifest = json.dumps({"version": version, "models": sorted(data)}, indent=2)
        write_atomically(
            Path(self._get_save_path()), lambda stream: stream.write(manifest.encode())
        )


class OtherSeedsDataset(_VersionedFile):
    """A strategy's models trained with its other seeds (`evaluation.seeds`): a list of `seed`,
    `image_model`, `held_out_predictions` and `fit_seconds`, versioned as one.

    `filepath` is the versioned JSON list of seeds and fit times; each model is saved as an
    `image_model` is (`<folder>/seed_<s>/image_model/<version>/`, no pickle) and its held-out
    predictions as a .npz beside it, under the same version. Persisted, not kept in memory, so
    that training and evaluation can be separate tasks (an Airflow DAG) and a re-evaluation
    scores them again. With one seed the list is empty: a small JSON file, no model.
    """

    def __init__(
        self,
        filepath: str,
        folder: str,
        version: Version | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(filepath, version, metadata)
        self.folder = folder

    def _parts(self, seed: int, version: Version) -> tuple[ImageModelDataset, ArraysDataset]:
        base = Path(self.folder) / f"seed_{seed}"
        return (
            ImageModelDataset(str(base / "image_model"), None, version),
            ArraysDataset(str(base / "held_out_predictions.npz"), version),
        )

    def load(self) -> list[dict[str, Any]]:
        manifest = json.loads(Path(self._get_load_path()).read_text())
        others = []
        for entry in manifest["seeds"]:
            model, held_out = self._parts(entry["seed"], Version(manifest["version"], None))
            others.append(
                {**entry, "image_model": model.load(), "held_out_predictions": held_out.load()}
            )
        return others

    def save(self, data: list[dict[str, Any]]) -> None:
        version = self.resolve_save_version()
        for other in data:
            model, held_out = self._parts(other["seed"], Version(None, version))
            model.save(other["image_model"])
            held_out.save(other.get("held_out_predictions", {}))
        # Written last: a run that fails half-way leaves no list naming missing models.
        seeds = [{"seed": int(o["seed"]), "fit_seconds": float(o["fit_seconds"])} for o in data]
        manifest = json.dumps({"version": version, "seeds": seeds}, indent=2)
        write_atomically(
            Path(self._get_save_path()), lambda stream: stream.write(manifest.encode())
        )


class RegisteredImageModelsDataset(AbstractDataset):
    """Logs each image model of a dict name → model to the active MLflow run and registers it
    as `<prefix><name>` (write only), as a strategy's `registered_image_model` is."""

    def __init__(
        self,
        prefix: str,
        code_paths: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.prefix = prefix
        self.code_paths = code_paths
        self.metadata = metadata

    def load(self) -> dict[str, Any]:
        raise DatasetError("Registered models are read from the MLflow model registry.")

    def save(self, data: dict[str, Any]) -> None:
        for name, model in data.items():
            RegisteredImageModelDataset(
                f"{name}_image_model", f"{self.prefix}{name}", self.code_paths
            ).save(model)

    def _describe(self) -> dict[str, Any]:
        return {"prefix": self.prefix}
