"""Learning curves: test accuracy against the number of labelled training images per class.

The training sets are nested (the 10-per-class set of a seed contains its 5-per-class set) and
stratified, so a curve's points differ only by the images added. Every point of every strategy is
scored on the same whole test split, with the project's one evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats

from transfer_learning.core.config import check_known_keys
from transfer_learning.core.strategies import (
    FEATURES,
    KINDS,
    NETWORK,
    STRATEGY_FACTS,
    pretrained_of_kind,
    pretrained_strategies,
)

ALL = "all"
CURVE_COLUMNS = [
    "strategy",
    "per_class",
    "images_per_class",
    "seed",
    "accuracy",
    "balanced_accuracy",
    "fit_seconds",
    "head",
]
# A curve trains one model per point: the strategies that train one of their own.
CURVE_STRATEGIES = tuple(facts.name for facts in STRATEGY_FACTS if facts.kind in KINDS)


class CurveError(ValueError):
    """The `curve` block cannot be used as given."""


@dataclass(frozen=True)
class CurveSettings:
    """The `curve` block of parameters_learning_curve.yml."""

    per_class: tuple[int | str, ...] = (1, 2, 5, 10, 25, 50, 100, ALL)
    repeats: int = 3
    strategies: tuple[str, ...] = pretrained_strategies()  # frozen features vs fine-tuned

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> CurveSettings:
        check_known_keys(cls, params, "curve", CurveError)
        values = {key: tuple(v) if isinstance(v, list) else v for key, v in params.items()}
        settings = cls(**values)
        sizes = settings.per_class
        if not sizes or not all(
            size == ALL or (isinstance(size, int) and not isinstance(size, bool) and size >= 1)
            for size in sizes
        ):
            raise CurveError(
                f"curve.per_class={list(sizes)!r} must list whole numbers ≥ 1 and/or 'all'."
            )
        if not isinstance(settings.repeats, int) or settings.repeats < 1:
            raise CurveError(f"curve.repeats={settings.repeats!r} must be a whole number ≥ 1.")
        unknown = [s for s in settings.strategies if s not in CURVE_STRATEGIES]
        if unknown or not settings.strategies:
            raise CurveError(
                f"curve.strategies={list(settings.strategies)!r}: use some of "
                f"{', '.join(CURVE_STRATEGIES)}."
            )
        return settings

    def sizes(self) -> list[int | str]:
        """The sizes in increasing order, 'all' last, without repeats."""
        numbers = sorted({size for size in self.per_class if size != ALL})
        return [*numbers, *([ALL] if ALL in self.per_class else [])]

    def seeds(self, seed: int) -> list[int]:
        return [seed + repeat for repeat in range(self.repeats)]


def nested_subsets(
    labels: np.ndarray, sizes: Sequence[int | str], seed: int
) -> dict[int | str, np.ndarray]:
    """Positions into `labels` of the training set of each size, stratified and nested.

    Each class's images are put in one seeded random order; size k takes the first k of every
    class (all of a class that has fewer), so a larger set always contains a smaller one.
    """
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(np.flatnonzero(labels == label)) for label in np.unique(labels)]
    return {
        size: np.sort(np.concatenate([order if size == ALL else order[:size] for order in orders]))
        for size in sizes
    }


def draw_subsets(train_index: pd.DataFrame, settings: CurveSettings, seed: int) -> pd.DataFrame:
    """One row per (seed, per_class, training image): which images each curve point trains on."""
    labels = train_index["label"].to_numpy()
    rows = []
    for repeat_seed in settings.seeds(seed):
        for size, positions in nested_subsets(labels, settings.sizes(), repeat_seed).items():
            rows.append(
                pd.DataFrame(
                    {
                        "seed": repeat_seed,
                        "per_class": str(size),
                        "location": train_index["location"].to_numpy()[positions],
                        "label": labels[positions],
                    }
                )
            )
    return pd.concat(rows, ignore_index=True)


def curve_points(subsets: pd.DataFrame) -> list[tuple[int, str, pd.DataFrame]]:
    """(seed, per_class, its training rows) for every point, smallest sizes first."""
    return [
        (int(seed), str(per_class), rows.reset_index(drop=True))
        for (seed, _, per_class), rows in subsets.assign(
            order=subsets["per_class"].map(_size_order)
        ).groupby(["seed", "order", "per_class"], sort=True)
    ]


def _size_order(per_class: str) -> float:
    return math.inf if per_class == ALL else float(per_class)


def images_per_class(labels: np.ndarray) -> float:
    """The mean number of training images a class has at one point (the curve's x value)."""
    return float(np.unique(labels, return_counts=True)[1].mean())


def summarise(curve: pd.DataFrame) -> pd.DataFrame:
    """Mean accuracy and its 95 % t-interval over seeds, per strategy and size."""
    rows = []
    for (strategy, per_class), group in curve.groupby(["strategy", "per_class"], sort=False):
        row = {
            "strategy": strategy,
            "per_class": per_class,
            "images_per_class": float(group["images_per_class"].mean()),
            "runs": len(group),
            "fit_seconds": float(group["fit_seconds"].mean()),
            "head": ", ".join(sorted(set(group["head"].dropna()) - {""})),
        }
        for metric in ("accuracy", "balanced_accuracy"):
            mean, half_width = mean_and_interval(group[metric].to_numpy())
            row[metric] = mean
            row[f"{metric}_low"] = mean - half_width
            row[f"{metric}_high"] = mean + half_width
        rows.append(row)
    summary = pd.DataFrame(rows)
    return summary.sort_values(["strategy", "images_per_class"], ignore_index=True)


def mean_and_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of its t confidence interval (0 width from a single run)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, 0.0
    sem = float(np.std(values, ddof=1) / math.sqrt(len(values)))
    return mean, float(stats.t.ppf(0.5 + level / 2, len(values) - 1) * sem)


def crossing_point(summary: pd.DataFrame, features: str, tuned: str) -> str | None:
    """The smallest size from which `tuned` has the higher mean accuracy at every larger size,
    or None when it never does (or one of the two strategies is not in the curve)."""
    means = summary.pivot(index="per_class", columns="strategy", values="accuracy")
    if features not in means or tuned not in means:
        return None
    order = sorted(means.index, key=_size_order)
    ahead = [means.loc[size, tuned] > means.loc[size, features] for size in order]
    for position, size in enumerate(order):
        if all(ahead[position:]):
            return size
    return None


def report(summary: pd.DataFrame, test_images: int) -> str:
    """learning_curve.md: a table per strategy and the crossing point, in words."""
    features, tuned = pretrained_of_kind(FEATURES), pretrained_of_kind(NETWORK)
    crossing = crossing_point(summary, features, tuned)
    if crossing is None:
        verdict = (
            f"Fine-tuning ({tuned}) does not overtake frozen features "
            f"({features}) at any measured size, or one of them is not in the curve."
        )
    else:
        verdict = (
            f"Fine-tuning ({tuned}) overtakes frozen features ({features}) from "
            f"**{crossing} labelled images per class** on (mean test accuracy, every larger size)."
        )
    lines = [
        "# Learning curve",
        "",
        f"Test accuracy on the same {test_images} test images for every point; mean over seeds "
        "and its 95 % t-interval. Training sets are nested and stratified; model selection "
        "uses the val split only.",
        "",
        verdict,
        "",
        "| strategy | per class | images / class | runs | accuracy (95 % interval) | "
        "balanced accuracy (95 % interval) | fit (s) | head |",
        "|---|---:|---:|---:|---|---|---:|---|",
    ]
    for row in summary.itertuples():
        lines.append(
            f"| {row.strategy} | {row.per_class} | {row.images_per_class:.1f} | {row.runs} | "
            f"{row.accuracy:.3f} ({row.accuracy_low:.3f}–{row.accuracy_high:.3f}) | "
            f"{row.balanced_accuracy:.3f} ({row.balanced_accuracy_low:.3f}–"
            f"{row.balanced_accuracy_high:.3f}) | {row.fit_seconds:.1f} | {row.head} |"
        )
    return "\n".join(lines) + "\n"


def curve_figure(summary: pd.DataFrame, colours: Mapping[str, str]) -> Figure:
    """Accuracy against labelled images per class (log axis), a line and 95 % band per strategy."""
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    for strategy, rows in summary.groupby("strategy", sort=False):
        colour = colours.get(strategy)
        x = rows["images_per_class"]
        axes.plot(x, rows["accuracy"], marker="o", color=colour, label=strategy)
        axes.fill_between(
            x, rows["accuracy_low"], rows["accuracy_high"], color=colour, alpha=0.2, linewidth=0
        )
    axes.set_xscale("log")
    axes.set_xlabel("labelled training images per class")
    axes.set_ylabel("test accuracy")
    axes.set_title("Learning curve (mean and 95 % interval over seeds)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure
