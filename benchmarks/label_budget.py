"""Which images to label: a simulated labelling loop on real data with the labels hidden.

    python benchmarks/label_budget.py --flowers data/01_raw/flowers --cifar10 data/01_raw/cifar10_jpeg

Each data set's train images are the unlabelled pool; its test images are scored only. The loop
starts from one labelled image a class (a seeded draw), then asks `features.acquisition`'s
`rank_pool` for the next batch (rounds of 10 images up to --budget labels, and rounds of 5 % of
the pool), "labels" them from the hidden labels, refits the project's default head
(`models.heads.select_and_fit`: prototype or logistic regression, chosen by cross-validation)
and scores the test split. Methods side by side, same seeds, same start: random, margin (the
uncertainty baseline), typicality (TypiClust) and auto (the project's default: typicality from a
cold start, margin once every class has COLD_START_PER_CLASS labels on average). The figures:
test accuracy against labels (mean of --seeds), the labels each method needs to reach 90 % of
the accuracy with every pool label, and, against random, the gain at 100 labels and the share
of random's labels each method needs to reach random's 100-label accuracy.

Features come from the project's extractor and its content-keyed cache (EfficientNet-Lite0, the
image size `auto` picks). The digits (bundled) are the third data set.
"""

from __future__ import annotations

import argparse
import logging
import platform
import time
from dataclasses import dataclass

import numpy as np

from transfer_learning.core.runtime import resolve_device
from transfer_learning.data.duplicates import same_picture_check
from transfer_learning.data.index import build_image_index, profile_images
from transfer_learning.data.settings import DataSettings
from transfer_learning.features.acquisition import (
    COLD_START_PER_CLASS,
    LabelNextSettings,
    close_in_features,
    rank_pool,
)
from transfer_learning.features.extraction import ExtractionSettings, extract_features
from transfer_learning.models.backbones import BackboneSettings, build_backbone, resolve_image_size
from transfer_learning.models.heads import HeadSettings, select_and_fit

METHODS = ("random", "margin", "typicality", "auto")


@dataclass
class Data:
    name: str
    pool: np.ndarray  # features
    pool_labels: np.ndarray  # hidden from the methods; revealed when "labelled"
    pool_locations: list[str]
    test: np.ndarray
    test_labels: np.ndarray
    n_classes: int


def load(
    name: str, settings: DataSettings, per_class: int | None, test_per_class: int | None, cache: str
) -> Data:
    index, classes, _ = build_image_index(settings, seed=0)
    is_test = (
        index["location"].str.contains("/test/")
        if settings.source != "digits"
        else index["split"] == "test"
    )
    pool, test = index[~is_test], index[is_test]
    if per_class:  # a seeded draw of per_class images a class
        pool = pool.sample(frac=1, random_state=0).groupby("label").head(per_class)
    if test_per_class:
        test = test.sample(frac=1, random_state=0).groupby("label").head(test_per_class)
    short_side = profile_images(index, settings, seed=0)["typical_short_side"]
    backbone = build_backbone(resolve_image_size(BackboneSettings(), short_side))
    locations = pool["location"].tolist() + test["location"].tolist()
    started = time.perf_counter()
    result = extract_features(
        backbone,
        locations,
        ExtractionSettings(cache_dir=cache, progress=False),
        resolve_device("cpu"),
    )
    print(
        f"{name}: {len(pool)} pool + {len(test)} test images, {backbone.name}@{backbone.preprocessing.image_size}px, "
        f"features in {time.perf_counter() - started:.0f} s{' (cached)' if result.cached else ''}",
        flush=True,
    )
    features = np.asarray(result.features)
    return Data(
        name,
        features[: len(pool)],
        pool["label"].to_numpy(),
        pool["location"].tolist(),
        features[len(pool) :],
        test["label"].to_numpy(),
        len(classes),
    )


def accuracy(data: Data, labelled: list[int], seed: int) -> float:
    x, y = data.pool[labelled], data.pool_labels[labelled]
    head = select_and_fit((x, y), (x[:0], y[:0]), HeadSettings(), seed)
    return float((head.model.predict(data.test) == data.test_labels).mean())


def simulate(
    data: Data, method: str, seed: int, schedule: list[int], checks
) -> list[tuple[int, float]]:
    """(labels, test accuracy) after each round of `schedule` (cumulative label counts)."""
    rng = np.random.default_rng(seed)
    labelled = [
        int(rng.choice(np.flatnonzero(data.pool_labels == c))) for c in range(data.n_classes)
    ]
    curve = [(len(labelled), accuracy(data, labelled, seed))]
    for target in schedule:
        if target <= len(labelled):
            continue
        x, y = data.pool[labelled], data.pool_labels[labelled]
        head = select_and_fit((x, y), (x[:0], y[:0]), HeadSettings(), seed)
        unlabelled = np.setdiff1d(np.arange(len(data.pool)), labelled)
        resolved = LabelNextSettings(method=method).resolved_method(len(labelled), data.n_classes)
        probabilities = head.model.predict_proba(data.pool[unlabelled])
        ranked = rank_pool(
            data.pool[unlabelled],
            x,
            y,
            probabilities,
            resolved,
            target - len(labelled),
            seed,
            lambda positions, among=unlabelled: checks(among[positions], positions),
        )
        labelled += unlabelled[ranked.positions].tolist()
        curve.append((len(labelled), accuracy(data, labelled, seed)))
    return curve


def labels_to_reach(curve: list[tuple[int, float]], level: float) -> float:
    reached = [n for n, value in curve if value >= level]
    return float(reached[0]) if reached else float("nan")


def run(data: Data, seeds: int, budget: int, cache: str) -> None:
    close = close_in_features(data.pool, seed=0)
    same = same_picture_check(data.pool_locations, cache)

    def checks(pool_positions, positions):
        # Both checks in pool positions, mapped back to the positions rank_pool gave.
        back = dict(zip(pool_positions.tolist(), positions.tolist(), strict=True))
        pairs = close(pool_positions) + same(pool_positions)
        return [(back[a], back[b]) for a, b in pairs]

    everything = accuracy(data, list(range(len(data.pool))), 0)
    level = 0.9 * everything
    print(
        f"{data.name}: every pool label ({len(data.pool)}): {everything:.1%}; 90 % of it: {level:.1%}"
    )
    # From one label a class, 10 more a round; 100 labels is a point of every schedule.
    tens = sorted({*range(data.n_classes + 10, budget + 1, 10), 100})
    fives = [round(f * len(data.pool)) for f in (0.05, 0.10, 0.15, 0.20)]
    for schedule_name, schedule in (("rounds of 10", tens), ("rounds of 5 % of the pool", fives)):
        curves = {}
        for method in METHODS:
            started = time.perf_counter()
            curves[method] = [
                simulate(data, method, seed, schedule, checks) for seed in range(seeds)
            ]
            seconds = time.perf_counter() - started
            mean = np.mean([[value for _, value in curve] for curve in curves[method]], axis=0)
            counts = [n for n, _ in curves[method][0]]
            print(
                f"  {schedule_name} | {method:10s} | {seconds:5.0f} s | "
                + " ".join(f"{n}:{a:.1%}" for n, a in zip(counts, mean, strict=True)),
                flush=True,
            )
        summarise(curves, level, schedule_name)


def summarise(curves, level: float, schedule_name: str) -> None:
    def mean_curve(method):
        counts = [n for n, _ in curves[method][0]]
        return list(
            zip(counts, np.mean([[v for _, v in c] for c in curves[method]], axis=0), strict=True)
        )

    random_curve = mean_curve("random")
    at_100 = dict(random_curve).get(100)
    print(f"  {schedule_name}: labels to reach 90 % of every-label accuracy (mean curve):")
    for method in METHODS:
        curve = mean_curve(method)
        line = f"    {method:10s} {labels_to_reach(curve, level):6.0f} labels"
        if at_100 is not None and 100 in dict(curve):
            gain = dict(curve)[100] - at_100
            share = labels_to_reach(curve, at_100) / 100
            line += f" | at 100 labels {dict(curve)[100]:.1%} ({gain * 100:+.1f} points on random) | reaches random's 100-label accuracy with {share:.2f}x its labels"
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--flowers", help="the flowers folder (train/, test/)")
    parser.add_argument("--cifar10", help="the CIFAR-10 JPEG folder (train/, test/)")
    parser.add_argument("--cifar10-per-class", type=int, default=300, help="pool images a class")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=150)
    parser.add_argument("--cache-dir", default="data/04_feature/cache")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the head's per-fit log lines
    print(
        f"{platform.processor() or platform.machine()}, {platform.system()}; auto switches at {COLD_START_PER_CLASS} labels a class"
    )
    sets = []
    if args.flowers:
        sets.append(("flowers", DataSettings(source="imagefolder", path=args.flowers), None, None))
    if args.cifar10:
        sets.append(
            (
                "cifar10",
                DataSettings(source="imagefolder", path=args.cifar10),
                args.cifar10_per_class,
                100,
            )
        )
    sets.append(("digits", DataSettings(), None, None))
    for name, settings, per_class, test_per_class in sets:
        run(
            load(name, settings, per_class, test_per_class, args.cache_dir),
            args.seeds,
            args.budget,
            args.cache_dir,
        )


if __name__ == "__main__":
    main()
