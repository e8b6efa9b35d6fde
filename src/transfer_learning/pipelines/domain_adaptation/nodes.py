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

from transfer_learning.adaptation.base import AdaptationMethod, FeatureSource, NetworkSource
from transfer_learning.adaptation.network import has_batchnorm
from transfer_learning.adaptation.registry import (
    AdaptationSettings,
    adapted_model_name,
    base_strategy,
    should_run,
)
from transfer_learning.adaptation.shift import domain_shift
from transfer_learning.core.runtime import resolve_device
from transfer_learning.core.strategies import FEATURES
from transfer_learning.core.tasks import require_single_task
from transfer_learning.data.index import index_target_images
from transfer_learning.data.settings import DataSettings
from transfer_learning.features.extraction import ExtractionSettings, extract_features
from transfer_learning.kedro_io.tracking import MlflowMetrics, mlflow_metrics
from transfer_learning.models.backbones import BackboneSettings, build_backbone
from transfer_learning.models.heads import HeadSettings
from transfer_learning.reporting.adaptation import adaptation_figure, adaptation_markdown
from transfer_learning.reporting.evaluation import evaluate_predictions
from transfer_learning.serving.classifier import ImageClassifier
from transfer_learning.serving.packaging import (
    head_image_model,
    local_image_classifier,
    network_image_model,
)
from transfer_learning.serving.scoring import score_test_split, select_test_split
from transfer_learning.training.recipe import Recipe

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
    registry: tuple[AdaptationMethod, ...],
) -> dict[str, float]:
    """How well a classifier tells source (train+val) from target features, held out."""
    settings = AdaptationSettings.from_params(adaptation, registry)
    source = image_features["features"][image_features["split"] != "test"]
    shift = domain_shift(source, target_features["features"], settings.shift_max_images, seed)
    logger.info(
        "Domain shift: a domain classifier is %.1f %% right (50 %% = no shift), proxy A-distance %.2f",
        100 * shift["domain_classifier_accuracy"],
        shift["proxy_a_distance"],
    )
    return shift


def adapt_head(  # noqa: PLR0913 (the head, the features it saw, the target's, settings)
    head: Pipeline,
    train_features: dict[str, np.ndarray],
    val_features: dict[str, np.ndarray],
    target_features: dict[str, np.ndarray],
    head_params: dict[str, Any],
    adaptation: dict[str, Any],
    seed: int,
    method: AdaptationMethod,
    registry: tuple[AdaptationMethod, ...],
) -> Adapted:
    """The pretrained features strategy's head, adapted by `method` (a features-kind method)."""
    settings = AdaptationSettings.from_params(adaptation, registry)
    if not should_run(method, settings):
        return {}
    source = FeatureSource(
        head,
        (train_features["features"], train_features["label"]),
        (val_features["features"], val_features["label"]),
        target_features["features"],
        HeadSettings.from_params(head_params),
    )
    return {method.name: method.adapt(source, settings.of(method), seed)}


def adapt_network(  # noqa: PLR0913 (source model, recipe and rows; target rows; settings)
    model: dict[str, Any],
    recipe: Recipe,
    train_index: pd.DataFrame,
    target_images: pd.DataFrame,
    adaptation: dict[str, Any],
    seed: int,
    device: str,
    method: AdaptationMethod,
    registry: tuple[AdaptationMethod, ...],
) -> Adapted:
    """The pretrained network strategy's fine-tuned network, adapted by `method` (a network-kind
    method); a method that needs BatchNorm is left out for a network without it."""
    settings = AdaptationSettings.from_params(adaptation, registry)
    if not should_run(method, settings, has_batchnorm(model)):
        return {}
    source = NetworkSource(
        model,
        recipe,
        train_index["location"].tolist(),
        train_index["label"].to_numpy(),
        target_images["location"].tolist(),
        resolve_device(device),
    )
    return {method.name: method.adapt(source, settings.of(method), seed)}


def package_adapted_models(
    class_names: dict[str, list[str]],
    backbone: dict[str, Any],
    *adapted: Adapted,
    registry: tuple[AdaptationMethod, ...],
) -> dict[str, ImageClassifier]:
    """Every adapted head or network as a deployable image model, named `<strategy>_<method>`."""
    by_name = {method.name: method for method in registry}
    models = {}
    for name, adapted_model in (item for group in adapted for item in group.items()):
        method = by_name[name]
        model_name = adapted_model_name(method)
        models[model_name] = (
            head_image_model(
                adapted_model, class_names, BackboneSettings.from_params(backbone), model_name
            )
            if method.kind == FEATURES
            else network_image_model(adapted_model, class_names, model_name)
        )
    return models


def evaluate_adaptation(  # noqa: PLR0913 (the models, both test splits, the shift)
    adapted_models: dict[str, Any],
    target_index: pd.DataFrame,
    image_index: pd.DataFrame,
    class_names: dict[str, list[str]],
    shift: dict[str, float],
    *source_models: Any,
    strategies: tuple[str, ...],
    registry: tuple[AdaptationMethod, ...],
) -> tuple[dict[str, Any], MlflowMetrics]:
    """Every model — each adapted strategy's source-only one (`source_models`, in the order of
    `strategies`) and its adapted ones — scored by the shared evaluation on the target test split
    (when the target is labelled) and the source test split."""
    names = class_names["classes"]
    target_test = target_index[target_index["split"] == "test"].reset_index(drop=True)
    source_test = select_test_split(image_index)
    by_strategy: dict[str, dict[str, Any]] = {}
    for strategy, source_only in zip(strategies, source_models, strict=True):
        rows = {"source_only": (strategy, source_only)}
        for method in registry:  # in the order of the report
            name = adapted_model_name(method)
            if base_strategy(method) == strategy and name in adapted_models:
                rows[method.name] = (name, adapted_models[name])
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
    return {name: local_image_classifier(model) for name, model in adapted_models.items()}
