"""Nodes of the comparison pipeline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from matplotlib.figure import Figure

from transfer_learning.reporting.comparison import (
    Control,
    comparison_figure,
    comparison_markdown,
    comparison_record,
    comparison_statistics,
    comparison_table,
    recall_table,
    task_table,
)


def compare_strategies(
    *inputs: Any, colours: Mapping[str, str], controls: tuple[Control, ...]
) -> tuple[str, Figure, dict[str, Any], dict[str, str]]:
    """comparison.md (the recommendation and how sure first; metrics with 95 % intervals; paired
    tests; per-class recall; with several label columns every task's metrics), the chart with
    error bars, comparison.json, and the recommendation as an MLflow tag.

    `inputs` are every strategy's `<strategy>.metrics`, then every strategy's
    `<strategy>.test_predictions`, then every strategy's `<strategy>.seed_predictions` (its
    other seeds' models' predicted labels), in registry order.
    """
    count = len(inputs) // 3
    reports, predictions, seed_predictions = (
        inputs[:count],
        inputs[count : 2 * count],
        inputs[2 * count :],
    )
    table = comparison_table(reports)
    statistics = comparison_statistics(reports, predictions, seed_predictions)
    markdown = comparison_markdown(
        table, controls, recall_table(reports), task_table(reports), statistics
    )
    tags = {"recommended_strategy": statistics["recommendation"]["strategy"]}
    return (
        markdown,
        comparison_figure(table, colours),
        comparison_record(reports, statistics),
        tags,
    )


def choose_champion(comparison_record: dict[str, Any]) -> dict[str, Any]:
    """The recommended strategy, to become the registered model's `champion`, and every
    strategy's test figures, for its registered version's description."""
    recommendation = comparison_record["recommendation"]
    return {
        "strategy": recommendation["strategy"],
        "reason": recommendation["reason"],
        "strategies": comparison_record["strategies"],
    }
