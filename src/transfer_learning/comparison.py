"""The side-by-side comparison of the strategies' test metrics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

COLUMNS = ("accuracy", "macro_f1", "ece", "fit_seconds", "trainable_parameters")


def comparison_table(reports: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per strategy with the compared metrics, in the order given."""
    return pd.DataFrame(
        [
            {"strategy": report["strategy"], **{c: report.get(c) for c in COLUMNS}}
            for report in reports
        ]
    ).set_index("strategy")


def comparison_markdown(table: pd.DataFrame) -> str:
    header = "| strategy | accuracy | macro-F1 | ECE | train time (s) | trainable parameters |"
    rows = [
        f"| {name} | {r.accuracy:.4f} | {r.macro_f1:.4f} | {r.ece:.4f} | {r.fit_seconds:.1f} | {int(r.trainable_parameters):,} |"
        for name, r in table.iterrows()
    ]
    best = table["accuracy"].idxmax()
    lines = [
        "# Transfer strategies compared on the test split",
        "",
        header,
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Best test accuracy: **{best}**. ECE is the expected calibration error (15 bins; lower is better).",
    ]
    if {"parameter_transfer", "structure_transfer"} <= set(table.index):
        gap = (
            table.loc["parameter_transfer", "accuracy"]
            - table.loc["structure_transfer", "accuracy"]
        )
        lines.append(
            f"What the pretrained weights are worth here: parameter_transfer − structure_transfer = "
            f"{gap * 100:+.1f} accuracy points."
        )
    return "\n".join(lines) + "\n"


def comparison_figure(table: pd.DataFrame) -> Figure:
    figure, axes = plt.subplots(1, len(COLUMNS), figsize=(3.2 * len(COLUMNS), 3.6))
    colours = ["#4C72B0", "#DD8452", "#55A868"][: len(table)]
    titles = {
        "accuracy": "accuracy ↑",
        "macro_f1": "macro-F1 ↑",
        "ece": "ECE ↓",
        "fit_seconds": "train time (s) ↓",
        "trainable_parameters": "trainable params",
    }
    for ax, column in zip(axes, COLUMNS, strict=True):
        ax.bar(range(len(table)), table[column].astype(float), color=colours)
        ax.set_xticks(range(len(table)), [s.replace("_", "\n") for s in table.index], fontsize=8)
        ax.set_title(titles[column])
        if column == "trainable_parameters":
            ax.set_yscale("log")
    figure.tight_layout()
    plt.close(figure)
    return figure
