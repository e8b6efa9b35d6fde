"""The side-by-side comparison of the strategies' test metrics, for any number of strategies."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

COLUMNS = ("accuracy", "macro_f1", "ece", "fit_seconds", "trainable_parameters")
TITLES = {
    "accuracy": "accuracy ↑",
    "macro_f1": "macro-F1 ↑",
    "ece": "ECE ↓",
    "fit_seconds": "train time (s) ↓",
    "trainable_parameters": "trainable params",
}
FALLBACK_COLOUR = "#8C8C8C"


@dataclass(frozen=True)
class Control:
    """A strategy that is the control of another: their accuracy gap is worth reporting."""

    treated: str  # the strategy that starts from pretrained weights
    control: str  # the same network trained from random weights
    shows: str  # what the gap measures, e.g. "what the pretrained weights are worth here"


TABLE_ONLY = ("balanced_accuracy", "image_size")  # in comparison.md, not in the chart


def comparison_table(reports: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per strategy with the compared metrics, in the order given."""
    return pd.DataFrame(
        [
            {"strategy": report["strategy"], **{c: report.get(c) for c in COLUMNS + TABLE_ONLY}}
            for report in reports
        ]
    ).set_index("strategy")


def recall_table(reports: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Test recall of every class (rows) for every strategy (columns)."""
    return pd.DataFrame({report["strategy"]: report.get("recall", {}) for report in reports})


def task_table(reports: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """With several label columns: one row per (strategy, task) with the task's test metrics
    (empty for single-task reports)."""
    rows = [
        {"strategy": report["strategy"], "task": task, **values}
        for report in reports
        for task, values in report.get("tasks", {}).items()
    ]
    return pd.DataFrame(rows)


def comparison_markdown(
    table: pd.DataFrame,
    controls: Sequence[Control] = (),
    recall: pd.DataFrame | None = None,
    tasks: pd.DataFrame | None = None,
) -> str:
    header = (
        "| strategy | accuracy | balanced accuracy | macro-F1 | ECE | train time (s) "
        "| trainable parameters | image size (px) |"
    )
    rows = [
        f"| {name} | {r.accuracy:.4f} | {_number(r.balanced_accuracy)} | {r.macro_f1:.4f} "
        f"| {r.ece:.4f} | {r.fit_seconds:.1f} | {int(r.trainable_parameters):,} "
        f"| {_size(r.image_size)} |"
        for name, r in table.iterrows()
    ]
    lines = [
        "# Transfer strategies compared on the test split",
        "",
        header,
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Best test accuracy: **{table['accuracy'].idxmax()}**. Balanced accuracy is the mean of "
        "the per-class recalls (below): it weighs every class equally, whatever its size. ECE is "
        "the expected calibration error (15 bins; lower is better).",
    ]
    for control in controls:
        if {control.treated, control.control} <= set(table.index):
            gap = table.loc[control.treated, "accuracy"] - table.loc[control.control, "accuracy"]
            lines.append(
                f"{control.shows[:1].upper()}{control.shows[1:]}: {control.treated} − "
                f"{control.control} = {gap * 100:+.1f} accuracy points."
            )
    if tasks is not None and not tasks.empty:
        lines += [
            "",
            "## Every task (test; the table above is the first task's)",
            "",
            "| strategy | task | accuracy | balanced accuracy | macro-F1 | ECE | test images |",
            "|---|---|---:|---:|---:|---:|---:|",
            *(
                f"| {r.strategy} | {r.task} | {r.accuracy:.4f} | {r.balanced_accuracy:.4f} "
                f"| {r.macro_f1:.4f} | {r.ece:.4f} | {int(r.n_test)} |"
                for r in tasks.itertuples()
            ),
        ]
    if recall is not None and not recall.empty:
        lines += [
            "",
            "## Per-class recall (test)",
            "",
            "| class | " + " | ".join(recall.columns) + " |",
            "|---|" + "---:|" * len(recall.columns),
            *(
                f"| {name} | " + " | ".join(_number(value) for value in row) + " |"
                for name, row in recall.iterrows()
            ),
        ]
    return "\n".join(lines) + "\n"


def _number(value: Any) -> str:
    return "–" if value is None or pd.isna(value) else f"{float(value):.4f}"


def _size(value: Any) -> str:
    return "–" if value is None or pd.isna(value) else str(int(value))


def comparison_figure(table: pd.DataFrame, colours: Mapping[str, str]) -> Figure:
    """One bar panel per compared metric, one bar per strategy in its registry colour."""
    figure = Figure(figsize=(3.2 * len(COLUMNS), 3.6))
    axes = figure.subplots(1, len(COLUMNS))
    bar_colours = [colours.get(name, FALLBACK_COLOUR) for name in table.index]
    for ax, column in zip(axes, COLUMNS, strict=True):
        ax.bar(range(len(table)), table[column].astype(float), color=bar_colours)
        ax.set_xticks(range(len(table)), [s.replace("_", "\n") for s in table.index], fontsize=8)
        ax.set_title(TITLES[column])
        if column == "trainable_parameters":
            ax.set_yscale("log")
    figure.tight_layout()
    return figure
