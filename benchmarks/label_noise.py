"""Finding flipped labels: the data_quality pipeline's confident learning against a baseline.

    python benchmarks/label_noise.py --data data/01_raw/flowers --rates 0.05 0.1 0.2
    python benchmarks/label_noise.py --data data/01_raw/cifar10_jpeg --per-class 300 --rates 0.05 0.1 0.2
    (--per-class: at most that many images a class in each split, drawn at random)

A share of the train+val labels is flipped to another class at random (seeded; test is never
touched), then the pipeline's own node finds the label issues with the shipped `head` settings
on the project's cached features (the shipped backbone at its `auto` size). For each rate, side
by side in the same run:

- confident learning (the project): precision and recall of the flagged images, and of the k
  most suspect (k = the number flipped, by label quality). Real data sets carry mistakes of
  their own (the images flagged on the labels as given): a second precision leaves those out,
  since flagging them again is neither a found flip nor a false alarm anyone can judge;
- baseline: every image whose out-of-fold prediction differs from its given label, on the same
  probabilities (cleanlab's `predicted_neq_given`).

First the whole data_quality pipeline (label issues, outliers, train/val duplicates, the report
and its montage) is timed on the labels as given, after the features are cached. Then, at
--act-rate of flipped labels, what acting on them is worth: feature_transfer's and
parameter_transfer's test accuracy (clean test labels; the learning curve's nodes with every
training image, the shipped `head` and `finetune` settings) trained on the clean labels, on the
flipped ones (`data.on_label_issue=keep`) and with the flagged images left out by the project's
own `data.on_label_issue=drop`.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from transfer_learning.core.runtime import usable_cores
from transfer_learning.core.tasks import Tasks
from transfer_learning.data.index import build_image_index, profile_images
from transfer_learning.data.label_issues import drop_label_issues
from transfer_learning.data.settings import DataSettings
from transfer_learning.pipelines.data_quality.nodes import (
    find_label_issues_in_features,
    find_outliers,
    find_train_val_duplicates,
    report_data_quality,
)
from transfer_learning.pipelines.feature_extraction.nodes import extract_image_features
from transfer_learning.pipelines.learning_curve.nodes import (
    draw_curve_subsets,
    finetuning_curve,
    head_curve,
)
from transfer_learning.reporting.curves import ALL

sys.path.insert(0, str(Path(__file__).parent))
from limited_data import resolved_backbone, shipped  # noqa: E402


def prepared(data: str, per_class: int | None, seed: int):
    """The folder's image index as ingestion makes it (at most `per_class` images a class in
    each split, drawn at random), and its features from the shipped backbone at its `auto`
    size, through the project's extractor and cache."""
    settings = DataSettings(source="imagefolder", path=data)
    index, classes, _ = build_image_index(settings, seed)
    if per_class is not None:
        shuffled = index.sample(frac=1.0, random_state=seed)
        index = (
            shuffled.groupby(["split", "label"]).head(per_class).sort_index().reset_index(drop=True)
        )
    profile = profile_images(index, settings, seed)
    backbone = resolved_backbone(index, profile, seed)
    start = time.perf_counter()
    features, _, _ = extract_image_features(
        index, backbone, {**shipped("extraction"), "progress": False}, "auto", {}
    )
    print(
        f"{data}: {len(index)} images, {len(classes)} classes, "
        f"{dict(index['split'].value_counts())}; {backbone['name']} at {backbone['image_size']} px; "
        f"features in {time.perf_counter() - start:.0f} s"
    )
    return index, {"classes": classes}, profile, backbone, features


def flipped(features: dict, rate: float, seed: int) -> tuple[dict, np.ndarray]:
    """The features with `rate` of the train+val labels flipped to another class at random."""
    rng = np.random.default_rng(seed)
    labels = features["label"].copy()
    n_classes = int(labels.max()) + 1
    flips = (rng.random(len(labels)) < rate) & (features["split"] != "test")
    labels[flips] = (labels[flips] + rng.integers(1, n_classes, flips.sum())) % n_classes
    return {**features, "label": labels, "task_labels": labels[:, None]}, flips


def precision_recall(flagged: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    hits = int((flagged & truth).sum())
    return hits / max(int(flagged.sum()), 1), hits / max(int(truth.sum()), 1)


def detection_row(
    features: dict, class_names: dict, head: dict, rate: float, suspects: set[str], args
) -> str:
    """One table row: confident learning and the baseline on `rate` flipped labels.

    `suspects` are the images flagged on the labels as given: the data set's own likely
    mistakes. Flagged again, they are neither a found flip nor a false alarm anyone can judge,
    so the second precision leaves them out (the first counts them as false alarms).
    """
    noisy, flips = flipped(features, rate, args.seed)
    issues, _, _ = find_label_issues_in_features(noisy, class_names, head, args.seed)
    row_of = {location: row for row, location in enumerate(noisy["location"])}
    truth = flips[issues["path"].map(row_of).to_numpy()]
    flagged = issues["is_label_issue"].to_numpy()
    precision, recall = precision_recall(flagged, truth)
    judged = ~issues["path"].isin(suspects).to_numpy() | truth
    precision_judged, _ = precision_recall(flagged & judged, truth)
    top = np.zeros(len(issues), dtype=bool)
    top[: int(truth.sum())] = True  # issues come most suspect first
    top_precision, _ = precision_recall(top, truth)
    disagrees = (issues["suggested_label"] != issues["given_label"]).to_numpy()
    base_precision, base_recall = precision_recall(disagrees, truth)
    base_judged, _ = precision_recall(disagrees & judged, truth)
    return (
        f"| {Path(args.data).name} {rate:.0%} | {int(truth.sum())} | {int(flagged.sum())} "
        f"| {precision:.3f} | {precision_judged:.3f} | {recall:.3f} | {top_precision:.3f} "
        f"| {int(disagrees.sum())} | {base_precision:.3f} | {base_judged:.3f} "
        f"| {base_recall:.3f} |"
    )


def timed_pipeline(
    features: dict, index: pd.DataFrame, class_names: dict, head: dict, args
) -> set[str]:
    """The data_quality pipeline's nodes on the labels as given, features cached; returns the
    images it flags (the data set's own suspects)."""
    start = time.perf_counter()
    issues, test_issues, noise = find_label_issues_in_features(
        features, class_names, head, args.seed
    )
    outliers = find_outliers(features, class_names)
    duplicates = find_train_val_duplicates(index, {"source": "imagefolder", "path": args.data})
    report_data_quality(issues, test_issues, noise, outliers, duplicates)
    print(
        f"\ndata_quality on the labels as given, features cached: {time.perf_counter() - start:.1f} s "
        f"({len(issues)} train+val, {len(test_issues)} test images; flagged "
        f"{int(issues['is_label_issue'].sum())}, test {int(test_issues['is_label_issue'].sum())}, "
        f"outliers {int(outliers['is_outlier'].sum())}, duplicate pairs {len(duplicates)})"
    )
    return set(issues.loc[issues["is_label_issue"], "path"])


def test_accuracy(index: pd.DataFrame, features: dict, strategy: str, context: dict) -> float:
    """`strategy` trained on the index's train split (val for its choices), on test."""
    features = {
        **features,
        "label": index["label"].to_numpy(np.int64),
        "split": index["split"].to_numpy(object),
    }
    full = {"per_class": [ALL], "repeats": 1, "strategies": [strategy]}
    subsets = draw_curve_subsets(index, context["class_names"], full, context["seed"])
    if strategy == "feature_transfer":
        frame = head_curve(
            features, subsets, context["class_names"], shipped("head"), full, strategy
        )
    else:
        frame = finetuning_curve(
            subsets,
            index,
            context["class_names"],
            context["backbone"],
            shipped("finetune"),
            None,
            context["profile"],
            {**shipped("training"), "progress": False},
            full,
            context["seed"],
            "auto",
            strategy,
        )
    return float(frame["accuracy"].iloc[0])


def acting_rows(index, features, class_names, context, args) -> list[str]:
    """keep vs drop at `args.act_rate` flipped labels, against the clean labels."""
    noisy_features, flips = flipped(features, args.act_rate, args.seed)
    names = np.asarray(class_names["classes"], dtype=object)
    noisy = index.assign(label=noisy_features["label"], class_name=names[noisy_features["label"]])
    issues, _, _ = find_label_issues_in_features(
        noisy_features, class_names, shipped("head"), args.seed
    )
    dropped = drop_label_issues(noisy, Tasks.from_class_names(class_names), issues, "drop")
    left_out = (dropped["split"] != noisy["split"]).to_numpy()
    print(
        f"\n{args.act_rate:.0%} flipped ({flips.sum()} images): drop leaves out {left_out.sum()} "
        f"({(left_out & flips).sum()} of them flipped)"
    )
    rows = []
    for strategy in args.strategies:
        start = time.perf_counter()
        clean, keep, drop = (
            test_accuracy(variant, features, strategy, context)
            for variant in (index, noisy, dropped)
        )
        recovered = (drop - keep) / (clean - keep) if clean != keep else float("nan")
        rows.append(
            f"| {Path(args.data).name} {args.act_rate:.0%} | {strategy} | {clean:.1%} | "
            f"{keep:.1%} | {drop:.1%} | {recovered:.0%} | {time.perf_counter() - start:.0f} |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--per-class", type=int, default=None, help="train+val images a class")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--act-rate", type=float, default=0.2, help="flipped share for keep/drop")
    parser.add_argument(
        "--strategies", nargs="*", default=["feature_transfer", "parameter_transfer"]
    )
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {usable_cores()} cores")
    index, class_names, profile, backbone, features = prepared(args.data, args.per_class, args.seed)
    head = shipped("head")
    suspects = timed_pipeline(features, index, class_names, head, args)
    print(
        "\n| data | flipped | flagged | precision | precision (own suspects left out) | recall "
        "| top-k precision (= recall) | baseline flagged | baseline precision "
        "| (own suspects left out) | baseline recall |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rate in args.rates:
        print(detection_row(features, class_names, head, rate, suspects, args), flush=True)
    if args.strategies:
        context = {
            "class_names": class_names,
            "backbone": backbone,
            "profile": profile,
            "seed": args.seed,
        }
        rows = acting_rows(index, features, class_names, context, args)
        print(
            "\n| data, flipped | strategy | clean labels | keep | drop | share of the loss "
            "drop recovers | seconds |"
        )
        print("|---|---|---:|---:|---:|---:|---:|")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
