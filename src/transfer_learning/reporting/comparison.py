"""The side-by-side comparison of the strategies' test metrics, for any number of strategies."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from transfer_learning.core.tasks import predicted_by_seed, task_predictions
from transfer_learning.reporting.statistics import (
    ALPHA,
    TEST_NAMES,
    detectability,
    pairwise_comparisons,
    recommendation,
)

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


# In comparison.md, not in the chart.
TABLE_ONLY = ("balanced_accuracy", "image_size", "ece_uncalibrated", "seeds")
# 95 % bootstrap intervals of the metrics that have one (`<metric>_interval` in the reports).
INTERVALS = ("accuracy_interval", "balanced_accuracy_interval", "macro_f1_interval")


def comparison_table(reports: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per strategy with the compared metrics, in the order given."""
    return pd.DataFrame(
        [
            {
                "strategy": report["strategy"],
                **{c: report.get(c) for c in COLUMNS + TABLE_ONLY + INTERVALS},
            }
            for report in reports
        ]
    ).set_index("strategy")


def _uncalibrated(ece: Any) -> str:
    return f" ({ece:.4f})" if isinstance(ece, int | float) and not pd.isna(ece) else ""


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
    statistics: Mapping[str, Any] | None = None,
) -> str:
    """comparison.md: with `statistics` (pairwise tests, recommendation, detectability: see
    `reporting.statistics`), the answer first — which strategy, and how sure."""
    header = (
        "| strategy | accuracy | balanced accuracy | macro-F1 | ECE (uncalibrated) | train time (s) "
        "| trainable parameters | image size (px) |"
    )
    rows = [
        f"| {name} | {_with_interval(r.accuracy, r.accuracy_interval)} "
        f"| {_with_interval(r.balanced_accuracy, r.balanced_accuracy_interval)} "
        f"| {_with_interval(r.macro_f1, r.macro_f1_interval)} "
        f"| {r.ece:.4f}{_uncalibrated(r.ece_uncalibrated)} | {r.fit_seconds:.1f} "
        f"| {int(r.trainable_parameters):,} | {_size(r.image_size)} |"
        for name, r in table.iterrows()
    ]
    lines = [
        "# Transfer strategies compared on the test split",
        "",
        *(_answer(statistics) if statistics else []),
        header,
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Best test accuracy: **{table['accuracy'].idxmax()}**. "
        + _interval_note(table)
        + "Balanced accuracy is the mean of the per-class recalls (below): it weighs every class "
        "equally, whatever its size. ECE is the expected calibration error (15 bins; lower is "
        "better) of the deployed model, calibrated by a temperature fitted on held-out images; "
        "in parentheses, the same model's before calibration.",
    ]
    for control in controls:
        if {control.treated, control.control} <= set(table.index):
            gap = table.loc[control.treated, "accuracy"] - table.loc[control.control, "accuracy"]
            lines.append(
                f"{control.shows[:1].upper()}{control.shows[1:]}: {control.treated} − "
                f"{control.control} = {gap * 100:+.1f} accuracy points."
            )
    if statistics and statistics.get("pairwise"):
        lines += _pairwise_lines(statistics["pairwise"])
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


def _interval_note(table: pd.DataFrame) -> str:
    """What the brackets are: over the test images, and over the seeds where there were several."""
    if not table["accuracy_interval"].notna().any():
        return ""
    seeds = {
        name: int(row["seeds"]["count"])
        for name, row in table.iterrows()
        if isinstance(row["seeds"], Mapping) and row["seeds"].get("count", 1) > 1
    }
    if not seeds:
        return "In brackets: 95 % intervals (percentile bootstrap over the test images). "
    listing = ", ".join(f"{name} {count}" for name, count in seeds.items())
    return (
        f"Trained with several seeds ({listing}; `evaluation.seeds`), a strategy's accuracy, "
        "balanced accuracy and macro-F1 are the means over its seeds' models, and its 95 % "
        "interval (in brackets) comes from a bootstrap that draws the seeds as well as the test "
        "images; its ECE is the deployed (first-seed) model's. Other brackets: percentile "
        "bootstrap over the test images. "
    )


def _answer(statistics: Mapping[str, Any]) -> list[str]:
    """The recommendation and how fine a difference the test set resolves, in words."""
    chosen = statistics["recommendation"]
    lines = [f"**Recommendation: {chosen['strategy']}.** {chosen['reason']}", ""]
    pairwise = statistics.get("pairwise", [])
    if pairwise and all(pair["p_value_holm"] >= ALPHA for pair in pairwise):
        lines += [
            f"On these {statistics['n_test']} test images **no difference between the "
            "strategies is detectable**: every paired test (below) has a Holm-adjusted "
            f"p ≥ {ALPHA}. Choose by cost, or test on more images.",
            "",
        ]
    resolution = statistics.get("detectability") or {}
    if resolution:
        first, second = resolution["between"]
        smallest = resolution["detectable_difference"]
        needed = resolution["images_for_one_point"]
        disagreement = resolution["disagreement"]
        text = (
            f"How fine this test set resolves: {first} and {second} disagree on "
            f"{disagreement * 100:.1f} % of the {resolution['n_test']} test images; "
        )
        text += (
            f"the smallest accuracy difference between them it detects (80 % power, α 0.05) is "
            f"{smallest * 100:.1f} points"
            if smallest is not None
            else "no difference between them is detectable with these images"
        )
        text += (
            f", and detecting a 1-point difference would need about {needed:,} test images."
            if needed is not None
            else "; they disagree too rarely for a 1-point difference to arise."
        )
        lines += [text, ""]
    return lines


def _pairwise_lines(pairwise: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [
        "",
        "## Paired comparisons (the same test images)",
        "",
        "| a | b | accuracy a − b (points) | 95 % interval | only a right | only b right "
        "| test | p | Holm-adjusted p |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|",
        *(
            f"| {pair['a']} | {pair['b']} | {pair['accuracy_difference'] * 100:+.1f} "
            f"| [{pair['interval'][0] * 100:+.1f}, {pair['interval'][1] * 100:+.1f}] "
            f"| {pair['a_only_right']} | {pair['b_only_right']} | {TEST_NAMES[pair['test']]} "
            f"| {pair['p_value']:.2g} | {pair['p_value_holm']:.2g} |"
            for pair in pairwise
        ),
        "",
        "The exact McNemar test asks whether the images only one strategy gets right split "
        'unevenly; Holm\'s adjustment keeps the chance of any false "significant" among all '
        f"pairs under {ALPHA}. The interval is a paired bootstrap of the difference.",
    ]
    if any(pair["test"] != "mcnemar_exact" for pair in pairwise):
        lines.append(
            "Where a strategy was trained with several seeds, the difference is between the "
            "means over the seeds, and the test is the paired bootstrap that draws the test "
            "images (the same for both) and each strategy's seeds: it covers the seed's "
            "variation too, which McNemar's test of two single models cannot. The only-right "
            "counts are the deployed (first-seed) models'."
        )
    return lines


def _with_interval(value: Any, interval: Any) -> str:
    if value is None or (not isinstance(value, (list, tuple)) and pd.isna(value)):
        return "–"
    if isinstance(interval, (list, tuple)) and len(interval) == 2:
        return f"{float(value):.4f} [{interval[0]:.3f}, {interval[1]:.3f}]"
    return f"{float(value):.4f}"


def _number(value: Any) -> str:
    return "–" if value is None or pd.isna(value) else f"{float(value):.4f}"


def _size(value: Any) -> str:
    return "–" if value is None or pd.isna(value) else str(int(value))


def _error_bars(table: pd.DataFrame, column: str) -> np.ndarray | None:
    """Distances from each bar to its interval's ends (2 × strategies), or None without any."""
    intervals = table.get(f"{column}_interval")
    if intervals is None or not intervals.map(lambda v: isinstance(v, (list, tuple))).any():
        return None
    values = table[column].astype(float).to_numpy()
    low = np.array([v[0] if isinstance(v, (list, tuple)) else np.nan for v in intervals])
    high = np.array([v[1] if isinstance(v, (list, tuple)) else np.nan for v in intervals])
    return np.nan_to_num(np.vstack([values - low, high - values]))


def comparison_figure(table: pd.DataFrame, colours: Mapping[str, str]) -> Figure:
    """One bar panel per compared metric, one bar per strategy in its registry colour; 95 %
    intervals as error bars where the reports have them."""
    figure = Figure(figsize=(3.2 * len(COLUMNS), 3.6))
    axes = figure.subplots(1, len(COLUMNS))
    bar_colours = [colours.get(name, FALLBACK_COLOUR) for name in table.index]
    for ax, column in zip(axes, COLUMNS, strict=True):
        values = table[column].astype(float)
        ax.bar(range(len(table)), values, color=bar_colours, yerr=_error_bars(table, column))
        ax.set_xticks(range(len(table)), [s.replace("_", "\n") for s in table.index], fontsize=8)
        ax.set_title(TITLES[column])
        if column == "trainable_parameters":
            ax.set_yscale("log")
    figure.tight_layout()
    return figure


RECORDED = (
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "ece",
    "ece_uncalibrated",
    "temperature",
    "n_test",
    "fit_seconds",
)


def comparison_statistics(
    reports: Sequence[Mapping[str, Any]],
    predictions: Sequence[Mapping[str, np.ndarray]],
    seed_predictions: Sequence[Mapping[str, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Paired tests of every pair of strategies on their test predictions (first task, on the
    images with its label), the recommendation and how fine a difference the test set resolves.

    `seed_predictions` are each strategy's other seeds' predicted labels (`predicted_0`, seeds ×
    test images of the first task; `evaluation.seeds`), compared with theirs as well.
    """
    names = [report["strategy"] for report in reports]
    seed_predictions = seed_predictions or [{} for _ in names]
    by_name = {
        name: (task_predictions(arrays, 0)[0], predicted_by_seed(arrays, others, task=0))
        for name, arrays, others in zip(names, predictions, seed_predictions, strict=True)
    }
    pairwise = pairwise_comparisons(by_name) if len(names) > 1 else []
    summaries = {
        report["strategy"]: {**report, "predict_seconds": report.get("predict_seconds", 0.0)}
        for report in reports
    }
    n_test = len(next(iter(by_name.values()))[0])
    return {
        "n_test": n_test,
        "pairwise": [pair.as_dict() for pair in pairwise],
        "recommendation": recommendation(summaries, pairwise),
        "detectability": detectability(summaries, pairwise, n_test),
    }


def comparison_record(
    reports: Sequence[Mapping[str, Any]], statistics: Mapping[str, Any]
) -> dict[str, Any]:
    """comparison.json: every strategy's metrics and intervals, the pairwise tests and the
    recommendation, for programs to read."""
    keys = RECORDED + INTERVALS + ("predict_seconds", "seeds")
    return {
        "strategies": {
            report["strategy"]: {key: report[key] for key in keys if key in report}
            for report in reports
        },
        "pairwise": statistics["pairwise"],
        "recommendation": statistics["recommendation"],
        "detectability": statistics["detectability"],
    }
