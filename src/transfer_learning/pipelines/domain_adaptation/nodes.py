"""Nodes of the domain_adaptation pipeline.

Target labels (when the target folder has class folders) stay in `target_index`, which only
`select_adaptation_images` (dropping them) and `evaluate_adaptation` read.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.pipeline import Pipeline

from transfer_learning.backbones import BackboneSettings, build_backbone
from transfer_learning.domain_adaptation import (
    METHODS,
    AdaptationSettings,
    CoralTransform,
    adabn_checkpoint,
    adapted_model_name,
    base_strategy,
    domain_shift,
    has_batchnorm,
    mcc_checkpoint,
    should_run,
    tent_checkpoint,
    with_target_standardisation,
)
from transfer_learning.domain_adaptation_report import adaptation_figure, adaptation_markdown
from transfer_learning.evaluation import evaluate_predictions
from transfer_learning.extraction import ExtractionSettings, extract_features, resolve_device
from transfer_learning.finetune import Recipe
from transfer_learning.heads import HeadSettings, select_and_fit
from transfer_learning.image_index import DataSettings, index_target_images
from transfer_learning.pipelines.evaluation.nodes import (
    register_image_model,
    score_test_split,
    select_test_split,
)
from transfer_learning.pipelines.feature_transfer.nodes import package_image_model as package_head
from transfer_learning.pipelines.parameter_transfer.nodes import (
    package_image_model as package_network,
)
from transfer_learning.serving import ImageClassifier
from transfer_learning.tasks import require_single_task
from transfer_learning.tracking import MlflowMetrics, mlflow_metrics

logger = logging.getLogger(__name__)

Adapted = dict[str, Any]  # method → adapted head or network checkpoint; empty when it did not run


def index_target(
    data: dict[str, Any], class_names: dict[str, list[str]], seed: int
) -> pd.DataFrame:
    """Index `data.target_path`: `adapt` rows (any labels are dropped before adaptation) and,
    for a labelled folder, a held-out `test` split for evaluation."""
    require_single_task(class_names, "domain_adaptation")
    target_index, skipped = index_target_images(
        DataSettings.from_params(data), class_names["classes"], seed
    )
    counts = target_index["split"].value_counts().to_dict()
    logger.info(
        "Target images: %d to adapt to, %d labelled for the target test (%d unreadable skipped)",
        counts.get("adapt", 0),
        counts.get("test", 0),
        len(skipped),
    )
    return target_index


def select_adaptation_images(target_index: pd.DataFrame) -> pd.DataFrame:
    """The images adaptation may use: the `adapt` rows, locations only — no labels."""
    return target_index.loc[target_index["split"] == "adapt", ["location"]].reset_index(drop=True)


def extract_target_features(
    target_images: pd.DataFrame, backbone: dict[str, Any], extraction: dict[str, Any], device: str
) -> dict[str, np.ndarray]:
    """The frozen backbone's features of the target images (the same backbone as the source's)."""
    model = build_backbone(BackboneSettings.from_params(backbone))
    locations = target_images["location"].tolist()
    result = extract_features(
        model, locations, ExtractionSettings.from_params(extraction), resolve_device(device)
    )
    return {
        "features": np.asarray(result.features, dtype=np.float32),
        "location": np.asarray(locations, dtype=str),
    }


def measure_domain_shift(
    image_features: dict[str, np.ndarray],
    target_features: dict[str, np.ndarray],
    adaptation: dict[str, Any],
    seed: int,
) -> dict[str, float]:
    """How well a classifier tells source (train+val) from target features, held out."""
    settings = AdaptationSettings.from_params(adaptation)
    source = image_features["features"][image_features["split"] != "test"]
    shift = domain_shift(source, target_features["features"], settings.shift_max_images, seed)
    logger.info(
        "Domain shift: a domain classifier is %.1f %% right (50 %% = no shift), proxy A-distance %.2f",
        100 * shift["domain_classifier_accuracy"],
        shift["proxy_a_distance"],
    )
    return shift


def standardise_with_target(
    head: Pipeline, target_features: dict[str, np.ndarray], adaptation: dict[str, Any]
) -> Adapted:
    """feature_transfer's head with the target's per-dimension mean and spread."""
    if not should_run("target_standardisation", AdaptationSettings.from_params(adaptation)):
        return {}
    return {
        "target_standardisation": with_target_standardisation(head, target_features["features"])
    }


def align_with_coral(
    train_features: dict[str, np.ndarray],
    val_features: dict[str, np.ndarray],
    target_features: dict[str, np.ndarray],
    head: dict[str, Any],
    adaptation: dict[str, Any],
    seed: int,
) -> Adapted:
    """A head chosen and fitted, as feature_transfer's, on source features CORAL-aligned to
    the target (hyper-parameters chosen on the aligned source val)."""
    settings = AdaptationSettings.from_params(adaptation)
    if not should_run("coral", settings):
        return {}
    align = CoralTransform.fit(
        train_features["features"], target_features["features"], settings.coral_regularisation
    )
    fitted = select_and_fit(
        (align(train_features["features"]), train_features["label"]),
        (align(val_features["features"]), val_features["label"]),
        HeadSettings.from_params(head),
        seed,
    )
    return {"coral": fitted.model}


def adapt_batchnorm_statistics(
    model: dict[str, Any], target_images: pd.DataFrame, adaptation: dict[str, Any], device: str
) -> Adapted:
    """parameter_transfer's network with BatchNorm statistics of the target images (AdaBN)."""
    if not should_run("adabn", AdaptationSettings.from_params(adaptation), has_batchnorm(model)):
        return {}
    locations = target_images["location"].tolist()
    return {"adabn": adabn_checkpoint(model, locations, resolve_device(device))}


def adapt_with_tent(
    model: dict[str, Any],
    target_images: pd.DataFrame,
    adaptation: dict[str, Any],
    seed: int,
    device: str,
) -> Adapted:
    """parameter_transfer's network after test-time entropy minimisation (TENT)."""
    settings = AdaptationSettings.from_params(adaptation)
    if not should_run("tent", settings, has_batchnorm(model)):
        return {}
    locations = target_images["location"].tolist()
    return {"tent": tent_checkpoint(model, locations, settings.tent, seed, resolve_device(device))}


def adapt_with_mcc(  # noqa: PLR0913 (source model, recipe and rows; target rows; settings)
    model: dict[str, Any],
    recipe: Recipe,
    train_index: pd.DataFrame,
    target_images: pd.DataFrame,
    adaptation: dict[str, Any],
    seed: int,
    device: str,
) -> Adapted:
    """parameter_transfer's network fine-tuned further with the MCC loss on target batches."""
    settings = AdaptationSettings.from_params(adaptation)
    if not should_run("mcc", settings):
        return {}
    checkpoint, history = mcc_checkpoint(
        model,
        recipe,
        train_index["location"].tolist(),
        train_index["label"].to_numpy(),
        target_images["location"].tolist(),
        settings.mcc,
        seed,
        resolve_device(device),
    )
    logger.info(
        "mcc: %d steps, source loss %.4f → %.4f, MCC loss %.4f → %.4f",
        len(history),
        history[0]["source_loss"],
        history[-1]["source_loss"],
        history[0]["mcc_loss"],
        history[-1]["mcc_loss"],
    )
    return {"mcc": checkpoint}


def package_adapted_models(
    class_names: dict[str, list[str]], backbone: dict[str, Any], *adapted: Adapted
) -> dict[str, ImageClassifier]:
    """Every adapted head or network as a deployable image model, named `<strategy>_<method>`."""
    models = {}
    for method, adapted_model in (item for group in adapted for item in group.items()):
        name = adapted_model_name(method)
        models[name] = (
            package_head(adapted_model, class_names, backbone, strategy=name)
            if isinstance(adapted_model, Pipeline)
            else package_network(adapted_model, class_names, strategy=name)
        )
    return models


def evaluate_adaptation(  # noqa: PLR0913 (the models, both test splits, the shift)
    adapted_models: dict[str, Any],
    feature_transfer_model: Any,
    parameter_transfer_model: Any,
    target_index: pd.DataFrame,
    image_index: pd.DataFrame,
    class_names: dict[str, list[str]],
    shift: dict[str, float],
) -> tuple[dict[str, Any], MlflowMetrics]:
    """Every model — each strategy's source-only one and its adapted ones — scored by the shared
    evaluation on the target test split (when the target is labelled) and the source test split."""
    names = class_names["classes"]
    target_test = target_index[target_index["split"] == "test"].reset_index(drop=True)
    source_test = select_test_split(image_index)
    sources = {
        "feature_transfer": feature_transfer_model,
        "parameter_transfer": parameter_transfer_model,
    }
    by_strategy: dict[str, dict[str, Any]] = {}
    for strategy, source_only in sources.items():
        rows = {"source_only": (strategy, source_only)}
        for method in METHODS:  # in the order of the report
            name = adapted_model_name(method)
            if base_strategy(method) == strategy and name in adapted_models:
                rows[method] = (name, adapted_models[name])
        by_strategy[strategy] = {
            method: _scores(model, model_name, target_test, source_test, names)
            for method, (model_name, model) in rows.items()
        }
    report = {
        "domain_shift": shift,
        "n_target_adapt": int((target_index["split"] == "adapt").sum()),
        "n_target_test": len(target_test),
        **by_strategy,
    }
    flat = {
        f"{strategy}.{method}.{key}": value
        for strategy, methods in by_strategy.items()
        for method, scores in methods.items()
        for key, value in scores.items()
        if isinstance(value, float)
    }
    flat.update({f"shift.{key}": float(value) for key, value in shift.items()})
    return report, mlflow_metrics(flat)


def _scores(model, model_name: str, target_test, source_test, names) -> dict[str, Any]:
    scores: dict[str, Any] = {"model": model_name, "n_target_test": len(target_test)}
    if len(target_test):
        predictions = score_test_split(model, target_test)
        metrics, *_ = evaluate_predictions(
            predictions["label"], predictions["probabilities"], names
        )
        scores.update(
            target_accuracy=metrics["accuracy"],
            target_balanced_accuracy=metrics["balanced_accuracy"],
            target_ece=metrics["ece"],
        )
    else:
        scores.update(target_accuracy=None, target_balanced_accuracy=None, target_ece=None)
    source = score_test_split(model, source_test)
    source_metrics, *_ = evaluate_predictions(source["label"], source["probabilities"], names)
    scores["source_test_accuracy"] = source_metrics["accuracy"]
    return scores


def report_adaptation(metrics: dict[str, Any], data: dict[str, Any]) -> tuple[str, Figure]:
    """domain_adaptation.md (the shift first, then every method next to source-only) and its chart."""
    source = data.get("path") or data.get("name") or data.get("source", "digits")
    markdown = adaptation_markdown(metrics, source, data.get("target_path"))
    return markdown, adaptation_figure(metrics)


def register_adapted_models(adapted_models: dict[str, Any]) -> dict[str, ImageClassifier]:
    """The evaluated adapted models, to be registered in MLflow as transfer_learning_<name>."""
    return {name: register_image_model(model) for name, model in adapted_models.items()}
