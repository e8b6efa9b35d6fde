"""Nodes of the comparison pipeline."""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

from transfer_learning.comparison import comparison_figure, comparison_markdown, comparison_table


def compare_strategies(
    feature_transfer: dict[str, Any],
    parameter_transfer: dict[str, Any],
    structure_transfer: dict[str, Any],
) -> tuple[str, Figure]:
    """comparison.md and a bar chart of accuracy, macro-F1, ECE, train time, trainable parameters."""
    table = comparison_table([feature_transfer, parameter_transfer, structure_transfer])
    return comparison_markdown(table), comparison_figure(table)
