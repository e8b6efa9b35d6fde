"""The comparison report for any number of strategies."""

from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib.colors import to_rgba

from transfer_learning.pipelines.comparison.nodes import compare_strategies
from transfer_learning.reporting.comparison import (
    FALLBACK_COLOUR,
    Control,
    comparison_figure,
    comparison_markdown,
    comparison_table,
    recall_table,
    task_table,
)
from transfer_learning.reporting.evaluation import evaluate_predictions
from transfer_learning.reporting.statistics import bootstrap_intervals


def report(strategy: str, accuracy: float, **extra) -> dict:
    values = {"macro_f1": accuracy - 0.01, "ece": 0.05, "fit_seconds": 12.5}
    return {
        "strategy": strategy,
        "accuracy": accuracy,
        "trainable_parameters": 1000,
        **values,
        **extra,
    }


REPORTS = [
    report("feature_transfer", 0.90, image_size=224),
    report(
        "parameter_transfer",
        0.955,
        image_size=224,
        balanced_accuracy=0.9,
        recall={"cat": 1.0, "dog": 0.8},
    ),
    report("structure_transfer", 0.93, image_size=224, ece_uncalibrated=0.0950),
    report("nearest_neighbour_transfer", 0.80),
]
CONTROL = Control(
    "parameter_transfer", "structure_transfer", "what the pretrained weights are worth here"
)


def test_every_strategy_gets_a_row_in_the_order_given():
    markdown = comparison_markdown(comparison_table(REPORTS), [CONTROL])
    rows = [
        line for line in markdown.splitlines() if line.startswith("| ") and "strategy" not in line
    ]
    assert [row.split(" | ")[0][2:] for row in rows] == [r["strategy"] for r in REPORTS]
    assert "| parameter_transfer | 0.9550 | 0.9000 | 0.9450 | 0.0500 | 12.5 | 1,000 | 224 |" in rows
    assert rows[0].startswith("| feature_transfer | 0.9000 | – |")  # no balanced accuracy
    # The deployed (calibrated) model's ECE, and in parentheses the same model's before it.
    assert "| structure_transfer | 0.9300 | – | 0.9200 | 0.0500 (0.0950) | 12.5 |" in rows[2]
    assert rows[-1].endswith("| 1,000 | – |")  # a strategy that reports no image size
    assert "Best test accuracy: **parameter_transfer**" in markdown
    # 0.955 − 0.93 = 2.5 points.
    assert (
        "What the pretrained weights are worth here: parameter_transfer − structure_transfer "
        "= +2.5 accuracy points." in markdown
    )


def test_per_class_recall_sits_under_the_table_for_every_strategy():
    markdown = comparison_markdown(comparison_table(REPORTS), [], recall_table(REPORTS))
    assert "## Per-class recall (test)" in markdown
    assert "| dog | – | 0.8000 | – | – |" in markdown


def test_a_control_without_its_pair_is_left_out():
    markdown = comparison_markdown(comparison_table(REPORTS[:2]), [CONTROL])
    assert "worth" not in markdown


def test_the_chart_has_a_bar_per_strategy_in_its_colour():
    colours = {
        "feature_transfer": "#4C72B0",
        "parameter_transfer": "#DD8452",
        "structure_transfer": "#55A868",
    }
    figure = comparison_figure(comparison_table(REPORTS), colours)
    assert len(figure.axes) == 5
    for axes in figure.axes:
        assert [bar.get_facecolor() for bar in axes.patches] == [
            to_rgba(c) for c in (*colours.values(), FALLBACK_COLOUR)
        ]
    accuracy = [bar.get_height() for bar in figure.axes[0].patches]
    assert accuracy == [0.90, 0.955, 0.93, 0.80]


def test_every_task_of_a_multi_task_run_gets_a_row_per_strategy():
    tasks = {
        "category": {
            "accuracy": 0.91,
            "balanced_accuracy": 0.9,
            "macro_f1": 0.89,
            "ece": 0.03,
            "n_test": 50,
        },
        "colour": {
            "accuracy": 0.75,
            "balanced_accuracy": 0.7,
            "macro_f1": 0.72,
            "ece": 0.08,
            "n_test": 41,
        },
    }
    reports = [report("feature_transfer", 0.91, tasks=tasks), report("parameter_transfer", 0.93)]
    table = task_table(reports)
    assert table[["strategy", "task"]].values.tolist() == [
        ["feature_transfer", "category"],
        ["feature_transfer", "colour"],
    ]
    markdown = comparison_markdown(comparison_table(reports), tasks=table)
    assert "| feature_transfer | colour | 0.7500 | 0.7000 | 0.7200 | 0.0800 | 41 |" in markdown
    # Single-task reports add no task section.
    assert "Every task" not in comparison_markdown(
        comparison_table(REPORTS), tasks=task_table(REPORTS)
    )


def scored(strategy: str, labels: np.ndarray, predicted: np.ndarray, fit_seconds: float):
    """A strategy's metrics (as evaluation writes them, intervals included) and its test
    predictions, for predictions given as labels."""
    probabilities = np.eye(5)[predicted] * 0.9 + 0.02
    metrics = evaluate_predictions(labels, probabilities, [str(c) for c in range(5)])[0]
    intervals = bootstrap_intervals(labels, predicted, 5)
    report = {
        "strategy": strategy,
        **metrics,
        **{f"{name}_interval": value for name, value in intervals.items()},
        "fit_seconds": fit_seconds,
        "predict_seconds": 1.0,
        "trainable_parameters": 1000,
    }
    return report, {"label": labels, "probabilities": probabilities}


def constructed(n_images: int, extra_right: int):
    """Three strategies on the same images: `costly` gets `extra_right` more right than `cheap`,
    `weak` gets a third of them wrong."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, n_images)
    common = rng.random(n_images) < 0.85
    cheap = np.where(common, labels, (labels + 1) % 5)
    costly = cheap.copy()
    fixed = np.flatnonzero(~common)[:extra_right]
    costly[fixed] = labels[fixed]
    weak = np.where(rng.random(n_images) < 0.66, labels, (labels + 2) % 5)
    return [
        scored("cheap", labels, cheap, 2.0),
        scored("costly", labels, costly, 300.0),
        scored("weak", labels, weak, 1.0),
    ]


def run_comparison(strategies, seed_predictions=None):
    reports = [report for report, _ in strategies]
    predictions = [arrays for _, arrays in strategies]
    seed_predictions = seed_predictions or [{"seeds": np.empty(0)} for _ in strategies]
    colours = {"cheap": "#4C72B0", "costly": "#DD8452", "weak": "#55A868"}
    return compare_strategies(
        *reports, *predictions, *seed_predictions, colours=colours, controls=()
    )


def test_one_image_apart_the_report_says_no_difference_is_detectable_and_picks_the_cheaper():
    markdown, figure, record, tags = run_comparison(constructed(150, 1))
    assert markdown.index("**Recommendation: cheap.**") < markdown.index("| strategy |")
    assert "not significantly below costly" in markdown
    pair = next(p for p in record["pairwise"] if {p["a"], p["b"]} == {"cheap", "costly"})
    assert (pair["a_only_right"], pair["b_only_right"]) == (0, 1)
    assert pair["p_value"] == pytest.approx(1.0) and pair["test"] == "mcnemar_exact"
    assert record["recommendation"]["strategy"] == "cheap" == tags["recommended_strategy"]
    # weak is far below both: significant after Holm, so not every pair is "not detectable".
    assert "no difference between the strategies is detectable" not in markdown
    low, high = record["strategies"]["cheap"]["accuracy_interval"]
    assert low < record["strategies"]["cheap"]["accuracy"] < high
    assert f"| cheap | {record['strategies']['cheap']['accuracy']:.4f} [{low:.3f}, {high:.3f}]" in (
        markdown
    )
    # Error bars: one line collection per panel with intervals (accuracy and macro-F1).
    assert len(figure.axes[0].collections) == 1 and len(figure.axes[1].collections) == 1
    assert not figure.axes[2].collections  # ECE has no interval
    resolution = record["detectability"]
    assert resolution["between"] == ["costly", "cheap"] and resolution["n_test"] == 150
    assert "smallest accuracy difference" in markdown or "no difference between them" in markdown


def test_many_images_apart_the_more_accurate_is_recommended():
    markdown, _, record, _ = run_comparison(constructed(2000, 120))
    pair = next(p for p in record["pairwise"] if {p["a"], p["b"]} == {"cheap", "costly"})
    assert pair["p_value_holm"] < 1e-20
    assert record["recommendation"]["strategy"] == "costly"
    assert "**Recommendation: costly.**" in markdown
    assert json.loads(json.dumps(record)) == record  # plain JSON


def test_when_no_pair_differs_the_report_says_so_plainly():
    strategies = constructed(150, 1)[:2]
    markdown, *_ = run_comparison(strategies)
    assert "no difference between the strategies is detectable" in markdown
