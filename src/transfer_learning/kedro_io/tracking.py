"""Shapes that kedro-mlflow's datasets expect."""

from __future__ import annotations

from collections.abc import Mapping

MlflowMetrics = dict[str, dict[str, float | int]]


def mlflow_metrics(values: Mapping[str, float], step: int = 0) -> MlflowMetrics:
    """{'name': value} → the {'name': {'value', 'step'}} form of MlflowMetricsHistoryDataset."""
    return {name: {"value": float(value), "step": step} for name, value in values.items()}
