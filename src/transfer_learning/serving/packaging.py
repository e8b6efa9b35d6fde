"""The deployable image model on disk: an MLflow pyfunc model whose files load without running code.

MLflow's default for a custom model pickles the Python object (`python_model.pkl`), and unpickling
runs whatever the file holds: anyone who can write to a model folder could run code in `predict`
or in the server. Here the model is packaged "from code": MLflow stores the entry
`packaged_model.py` (source, with the project's code beside it) and these files, each read in a
format that cannot execute anything:

- `network.pt`: the network's weights, read with `torch.load(weights_only=True)`;
- `head.skops`: the scikit-learn head (a strategy of the features kind), read by skops trusting only
  scikit-learn's types and `heads.TRUSTED_HEAD_TYPES`;
- `model.onnx` (where ONNX Runtime is installed when packaging, and the network exports): the same
  network with its normalisation as an ONNX graph, which the model runs on a CPU (about twice
  PyTorch's speed). Only checked files are used: on load it must be self-contained (no external
  data files) and give `network.pt`'s outputs to 1e-4 on a fixed batch, else PyTorch runs the
  model. `TRANSFER_LEARNING_ENGINE=torch` in the serving environment turns it off;
- `model.json`: strategy, classes (and with several label columns `tasks`: task → classes),
  backbone name, image size, the calibration's `temperatures` (task → T);
- a weighted combination of models: its `model.json` (kind `combined`, member weights) and each member's files
  under `member<i>_` names.

A file that fails these checks is refused with a `ModelFileError` naming it.
"""

from __future__ import annotations

import base64
import io
import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature, infer_signature
from mlflow.types.schema import ColSpec, Schema
from PIL import Image

from transfer_learning.models.backbones import BackboneSettings, build_backbone
from transfer_learning.models.heads import TRUSTED_HEAD_TYPES
from transfer_learning.models.onnx_network import export_checked, onnxruntime_installed
from transfer_learning.serving.classifier import CombinedClassifier, ImageClassifier, ImageModel
from transfer_learning.serving.requirements import image_model_requirements

ENTRY = Path(__file__).with_name("packaged_model.py")
FORMAT = 1  # model.json's "format": bumped when the files change meaning
COMBINED = "combined"  # model.json's "kind" of a weighted combination (absent: one network)
_REPACKAGE = (
    "Re-create the model with `kedro run --pipelines=<strategy>`, and keep model folders "
    "writable by you alone."
)


class ModelFileError(ValueError):
    """A packaged model's file is not what this project writes: it is refused, never loaded."""


class PackagedImageClassifier(mlflow.pyfunc.PythonModel):
    """What MLflow loads: an `ImageClassifier` rebuilt from the model's files in `load_context`."""

    classifier: ImageModel

    def load_context(self, context: Any) -> None:
        self.classifier = read_model_files(context.artifacts)

    def predict(self, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return self.classifier.predict(model_input, params)

    def predict_files(self, locations: Sequence[str]) -> pd.DataFrame:
        """The trusted local entry (your own files): see `ImageClassifier.predict_files`."""
        return self.classifier.predict_files(locations)


def local_image_classifier(image_model: Any) -> ImageModel:
    """The ImageModel itself, whether given directly, as MLflow's PyFuncModel (as the
    catalog loads it) or as its python model: `predict_files` is not part of the pyfunc API."""
    unwrap = getattr(image_model, "unwrap_python_model", None)
    model = unwrap() if unwrap is not None else image_model
    return model.classifier if isinstance(model, PackagedImageClassifier) else model


def write_model_files(model: ImageModel, folder: Path, prefix: str = "") -> dict[str, str]:
    """The model's state as files in `folder`; returns MLflow's `artifacts` (name → path).

    A combination writes its description, then each member's files under `member<i>_` names.
    """
    folder.mkdir(parents=True, exist_ok=True)
    spec: dict[str, Any] = {
        "format": FORMAT,
        "strategy": model.strategy,
        "classes": list(model.classes),
        "image_size": model.image_size,
        "batch_size": model.batch_size,
    }
    if len(model.tasks) > 1:
        spec["tasks"] = model.tasks
    if model.temperatures:
        spec["temperatures"] = model.temperatures
    artifacts = {f"{prefix}spec": folder / f"{prefix}model.json"}
    if isinstance(model, CombinedClassifier):
        spec.update(kind=COMBINED, weights=model.weights, members=len(model.members))
        written = {name: Path(path) for name, path in artifacts.items()}
        for i, member in enumerate(model.members):
            member_files = write_model_files(member, folder, prefix=f"{prefix}member{i}_")
            written.update({name: Path(path) for name, path in member_files.items()})
        artifacts = written
    else:
        spec["backbone_name"] = model.backbone_name
        artifacts[f"{prefix}network"] = folder / f"{prefix}network.pt"
        torch.save(model.network_state, artifacts[f"{prefix}network"])
        if model.head is not None:
            artifacts[f"{prefix}head"] = folder / f"{prefix}head.skops"
            artifacts[f"{prefix}head"].write_bytes(head_bytes(model.head))
        onnx_file = folder / f"{prefix}model.onnx"
        if onnxruntime_installed() and export_checked(
            model.uint8_network(), model.image_size, onnx_file, f"the {model.strategy} model"
        ):
            artifacts[f"{prefix}onnx"] = onnx_file
    artifacts[f"{prefix}spec"].write_text(json.dumps(spec, indent=2))
    return {name: str(path) for name, path in artifacts.items()}


def read_model_files(artifacts: Mapping[str, str], prefix: str = "") -> ImageModel:
    """The model the files describe, refusing any file this project would not write."""
    spec_file = Path(artifacts[f"{prefix}spec"])
    try:
        spec = json.loads(spec_file.read_text())
    except (OSError, ValueError) as error:
        raise ModelFileError(f"{spec_file} is not a readable model description: {error}") from error
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise ModelFileError(
            f"{spec_file} is not a format-{FORMAT} model description (format "
            f"{spec.get('format') if isinstance(spec, dict) else None!r}). {_REPACKAGE}"
        )
    try:
        if spec.get("kind") == COMBINED:
            members = [
                read_model_files(artifacts, prefix=f"{prefix}member{i}_")
                for i in range(int(spec["members"]))
            ]
            return CombinedClassifier(
                strategy=spec["strategy"],
                members=members,
                weights=spec["weights"],
                batch_size=spec["batch_size"],
                temperatures=spec.get("temperatures"),
            )
        network_state = _read_weights(Path(artifacts[f"{prefix}network"]))
        head_file = artifacts.get(f"{prefix}head")
        return ImageClassifier(
            strategy=spec["strategy"],
            classes=spec["classes"],
            backbone_name=spec["backbone_name"],
            image_size=spec["image_size"],
            network_state=network_state,
            head=load_head(Path(head_file)) if head_file else None,
            batch_size=spec["batch_size"],
            tasks=spec.get("tasks"),
            temperatures=spec.get("temperatures"),
            onnx_file=artifacts.get(f"{prefix}onnx"),
        )
    except KeyError as error:
        raise ModelFileError(f"{spec_file} lacks {error}. {_REPACKAGE}") from error


def _read_weights(network_file: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(network_file, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError, EOFError: all mean "refuse"
        raise ModelFileError(
            f"{network_file} is not a plain weights file: torch.load(weights_only=True) refused "
            f"it ({type(error).__name__}: {str(error).splitlines()[0]}). {_REPACKAGE}"
        ) from error


def head_bytes(head: Any) -> bytes:
    """A fitted scikit-learn head as skops bytes, refused now (not on load) if it holds types
    no load would trust, e.g. a head.type from another library."""
    import skops.io

    data = skops.io.dumps(head)
    untrusted = sorted(set(skops.io.get_untrusted_types(data=data)) - set(TRUSTED_HEAD_TYPES))
    if untrusted:
        raise ModelFileError(
            f"The head holds types that skops does not trust and this project does not list "
            f"({', '.join(untrusted)}): it could not be loaded safely. Use a scikit-learn "
            "classifier as head.type."
        )
    return data


def load_head(path: Path) -> Any:
    """A head written from `head_bytes`: scikit-learn's and the project's types only."""
    import skops.io

    try:
        untrusted = sorted(set(skops.io.get_untrusted_types(file=path)) - set(TRUSTED_HEAD_TYPES))
    except Exception as error:  # not a skops file at all (zip, schema and JSON errors)
        raise ModelFileError(
            f"{path} is not a skops head file ({type(error).__name__}: {error}). {_REPACKAGE}"
        ) from error
    if untrusted:
        raise ModelFileError(
            f"{path} holds types this project never stores in a head and does not trust: "
            f"{', '.join(untrusted)}. It was not written by transfer-learning or was changed "
            f"since; it was not loaded. {_REPACKAGE}"
        )
    return skops.io.load(path, trusted=list(TRUSTED_HEAD_TYPES))


def save_image_model(
    model: ImageModel, path: Path, code_paths: Sequence[str] | None = None
) -> None:
    """The model as an MLflow pyfunc folder at `path` (which must not exist), written whole or
    not at all: it appears under its name only once complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as scratch:
        partial = Path(scratch) / "model"
        mlflow.pyfunc.save_model(
            str(partial),
            python_model=str(ENTRY),
            artifacts=write_model_files(model, Path(scratch) / "files"),
            code_paths=list(code_paths) if code_paths else None,
            pip_requirements=image_model_requirements(),
        )
        partial.rename(path)


def log_image_model(
    model: ImageModel,
    name: str,
    registered_model_name: str | None = None,
    code_paths: Sequence[str] | None = None,
) -> None:
    """Logs the model to the active MLflow run (and registers it, the version tagged with
    `model_tags`), packaged as `save_image_model`, with its signature and an input example."""
    signature, example = serving_signature(model)
    with tempfile.TemporaryDirectory() as scratch:
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(ENTRY),
            artifacts=write_model_files(model, Path(scratch)),
            code_paths=list(code_paths) if code_paths else None,
            registered_model_name=registered_model_name,
            pip_requirements=image_model_requirements(),
            signature=signature,
            input_example=example,
        )
    if registered_model_name is not None and info.registered_model_version is not None:
        client = mlflow.MlflowClient()
        for key, value in model_tags(model).items():
            client.set_model_version_tag(
                registered_model_name, str(info.registered_model_version), key, value
            )


def serving_signature(model: ImageModel) -> tuple[ModelSignature, pd.DataFrame]:
    """What the served model takes and gives, for MLflow's serving and validation tools: rows
    of base64 `image` bytes (or a server-side `path`, where the deployer allows it), and per
    task the predicted class and one probability column per class, then `error` and
    `error_message`; the example is one small image, its output the model's own."""
    example = pd.DataFrame({"image": [example_image_base64()]})
    inputs = Schema(
        [ColSpec("string", "image", required=False), ColSpec("string", "path", required=False)]
    )
    outputs = infer_signature(example, model.predict(example)).outputs
    return ModelSignature(inputs=inputs, outputs=outputs), example


def example_image_base64(size: int = 32) -> str:
    """A small colour-gradient PNG, base64-encoded: an input example that any model decodes."""
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[::-1, None]), -1)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def model_tags(model: ImageModel) -> dict[str, str]:
    """A registered version's strategy, network(s) and image size, as searchable tags."""
    members = model.members if isinstance(model, CombinedClassifier) else [model]
    return {
        "strategy": model.strategy,
        "backbone": "+".join(dict.fromkeys(member.backbone_name for member in members)),
        "image_size": str(model.image_size),
    }


def load_image_model(path: Path) -> Any:
    """MLflow's PyFuncModel for a folder `save_image_model` wrote; a folder packaged any other
    way (an earlier version's pickled `python_model.pkl`) is refused before MLflow reads it."""
    from mlflow.models import Model

    pickled = sorted(str(p.relative_to(path)) for p in path.rglob("*.pkl"))
    flavor = Model.load(str(path)).flavors.get("python_function", {})
    if pickled or not flavor.get("model_code_path"):
        raise ModelFileError(
            f"{path} was not packaged by this version of transfer-learning (it holds "
            f"{', '.join(pickled) or 'no packaged_model.py entry'}): loading it could run "
            f"whatever a pickle holds, so it was not loaded. {_REPACKAGE}"
        )
    return mlflow.pyfunc.load_model(str(path))


def head_image_model(
    head: Any, class_names: Mapping[str, Any], backbone: BackboneSettings, strategy: str
) -> ImageClassifier:
    """A head on frozen features as the deployable images → probabilities model: the backbone's
    pretrained weights and preprocessing, then the head."""
    features = build_backbone(backbone)
    return ImageClassifier(
        strategy=strategy,
        classes=class_names["classes"],
        tasks=class_names.get("tasks"),
        backbone_name=features.name,
        image_size=features.preprocessing.image_size,
        network_state=features.features.state_dict(),
        head=head,
    )


def network_image_model(
    checkpoint: Mapping[str, Any], class_names: Mapping[str, Any], strategy: str
) -> ImageClassifier:
    """A trained network's checkpoint as the deployable images → probabilities model."""
    return ImageClassifier(
        strategy=strategy,
        classes=class_names["classes"],
        tasks=class_names.get("tasks"),
        backbone_name=checkpoint["backbone_name"],
        image_size=checkpoint["image_size"],
        network_state=checkpoint["state_dict"],
    )
