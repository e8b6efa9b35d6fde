"""Nodes of the backbone_selection pipeline."""

from __future__ import annotations

from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from transfer_learning.core.runtime import resolve_device
from transfer_learning.features.extraction import ExtractionSettings
from transfer_learning.features.selection import (
    SelectionSettings,
    rank_backbones,
    ranking_figure,
    ranking_markdown,
    recommendation,
    score_quality,
)
from transfer_learning.kedro_io.tracking import MlflowMetrics, mlflow_metrics


def rank_candidate_backbones(
    image_index: pd.DataFrame,
    data_profile: dict[str, Any],
    selection: dict[str, Any],
    extraction: dict[str, Any],
    seed: int,
    device: str,
) -> pd.DataFrame:
    """Every candidate's transferability scores and cross-validated probe accuracy, from the
    train+val images only; the best pretrained candidate by `selection.score` first."""
    return rank_backbones(
        image_index,
        data_profile,
        SelectionSettings.from_params(selection),
        ExtractionSettings.from_params(extraction),
        resolve_device(device),
        seed,
    )


def report_backbone_ranking(
    backbone_ranking: pd.DataFrame,
) -> tuple[str, Figure, MlflowMetrics, dict[str, Any]]:
    """backbone_ranking.md, the score-vs-probe chart, each score's τ and regret for MLflow, and
    the recommended candidate."""
    quality = score_quality(backbone_ranking)
    metrics = {
        f"{row.score}.{measure}": getattr(row, measure)
        for row in quality.itertuples()
        for measure in ("kendall_tau", "weighted_tau", "regret")
    }
    pick = recommendation(backbone_ranking)
    metrics["recommended.probe_accuracy"] = pick["probe_accuracy"]
    metrics["scoring_seconds"] = backbone_ranking["scoring_seconds"].sum()
    metrics["extraction_seconds"] = backbone_ranking["extraction_seconds"].sum()
    return (
        ranking_markdown(backbone_ranking, quality),
        ranking_figure(backbone_ranking),
        mlflow_metrics({k: v for k, v in metrics.items() if v == v}),  # NaN τ: not logged
        pick,
    )
