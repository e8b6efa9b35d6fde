"""Nodes of the comparison pipeline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from matplotlib.figure import Figure

from transfer_learning.reporting.comparison import (
    Control,
    comparison_figure,
    comparison_markdown,
    comparison_table,
    recall_table,
    task_table,
)


def compare_strategies(
    *reports: dict[str, Any], colours: Mapping[str, str], controls: tuple[Control, ...]
) -> tuple[str, Figure]:
    """comparison.md (with balanced accuracy, per-class recall and, with several label columns,
    every task's metrics) and a bar chart of accuracy,
    macro-F1, ECE, train time, trainable parameters.

    `reports` are the strategies' `<strategy>.metrics`, any number of them, in registry order.
    """
    table = comparison_table(reports)
    markdown = comparison_markdown(table, controls, recall_table(reports), task_table(reports))
    return markdown, comparison_figure(table, colours)
