"""The domain adaptation report: how different the domains are, then every method next to
source-only (data/08_reporting/domain_adaptation.md and .png)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from matplotlib.figure import Figure

from transfer_learning.core.strategies import COLOURS, STRATEGY_FACTS

SHIFT_WORDS = ((0.5, "hardly different"), (1.5, "clearly different"), (2.01, "very different"))


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _change(value: float | None, baseline: float | None) -> str:
    if value is None or baseline is None:
        return "–"
    return f"{100 * (value - baseline):+.1f}"


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def adapted_strategies(metrics: Mapping[str, Any]) -> list[str]:
    """The strategies whose models were adapted, in registry order."""
    return [facts.name for facts in STRATEGY_FACTS if facts.name in metrics]


def adaptation_markdown(metrics: Mapping[str, Any], source: str, target_path: str | None) -> str:
    """The report: how different the domains are, then every method next to source-only."""
    shift = metrics["domain_shift"]
    distance = shift["proxy_a_distance"]
    words = next(text for limit, text in SHIFT_WORDS if distance < limit)
    lines = [
        "# Domain adaptation",
        "",
        f"Source: `{source}` · target: `{target_path}` · "
        f"{metrics['n_target_adapt']} unlabelled target images to adapt to, "
        f"{metrics['n_target_test']} labelled target test images.",
        "",
        "## How different are the domains?",
        "",
        f"A classifier tells source from target features apart "
        f"{_percent(shift['domain_classifier_accuracy'])} of the time on held-out images "
        f"(50 % = indistinguishable); proxy A-distance **{distance:.2f}** (0 = same "
        f"distribution, 2 = disjoint): the target images look **{words}**.",
        "",
        "## Target test accuracy",
        "",
    ]
    if not metrics["n_target_test"]:
        lines += [
            "The target folder has no class folders named like the source classes, so there is "
            "no labelled target test split: the adapted models are saved and registered, but "
            "only their source test accuracy is known.",
            "",
        ]
    lines += [
        "| strategy | method | target accuracy | change (points) | balanced accuracy | ECE "
        "| source test accuracy | model |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for strategy in adapted_strategies(metrics):
        baseline = metrics[strategy]["source_only"]["target_accuracy"]
        for method, row in metrics[strategy].items():
            lines.append(
                f"| {strategy} | {method} | {_percent(row['target_accuracy'])} "
                f"| {_change(row['target_accuracy'], baseline) if method != 'source_only' else ''} "
                f"| {_percent(row['target_balanced_accuracy'])} "
                f"| {_number(row['target_ece'])} "
                f"| {_percent(row['source_test_accuracy'])} | `{row['model']}` |"
            )
    lines += [
        "",
        "Target labels are read only here, by the evaluation; adaptation saw the target images "
        "without them. Use an adapted model like any strategy's: "
        '`kedro run --pipelines=predict --params="predict.path=...,predict.strategy=<model>"`, or '
        "`models:/transfer_learning_<model>/<version>` from the MLflow registry.",
        "",
    ]
    return "\n".join(lines)


def adaptation_figure(metrics: Mapping[str, Any]) -> Figure:
    """Target test accuracy of every method, grouped by strategy, source-only as a line."""
    figure = Figure(figsize=(8, 4), layout="constrained")
    axes = figure.add_subplot()
    position = 0
    ticks, labels = [], []
    strategies = adapted_strategies(metrics)
    for strategy in strategies:
        rows = metrics[strategy]
        baseline = rows["source_only"]["target_accuracy"]
        first = position
        for method, row in rows.items():
            value = row["target_accuracy"]
            if value is None:
                value = row["source_test_accuracy"]  # unlabelled target: what is known
            axes.bar(
                position,
                100 * value,
                color=COLOURS[strategy],
                alpha=0.55 if method == "source_only" else 1.0,
            )
            ticks.append(position)
            labels.append(method)
            position += 1
        if baseline is not None:
            axes.hlines(
                100 * baseline,
                first - 0.4,
                position - 0.6,
                colors="black",
                linestyles="dashed",
                linewidth=1,
            )
        position += 0.8
    axes.set_xticks(ticks, labels, rotation=30, ha="right")
    measured = "target test" if metrics["n_target_test"] else "source test (no labelled target)"
    axes.set_ylabel(f"{measured} accuracy (%)")
    axes.set_title(f"Domain adaptation of {' and '.join(strategies)}")
    return figure
