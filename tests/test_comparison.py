"""The comparison report for any number of strategies."""

from __future__ import annotations

from matplotlib.colors import to_rgba

from transfer_learning.reporting.comparison import (
    FALLBACK_COLOUR,
    Control,
    comparison_figure,
    comparison_markdown,
    comparison_table,
    recall_table,
    task_table,
)


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
    report("structure_transfer", 0.93, image_size=224),
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
