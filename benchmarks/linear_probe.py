"""Feature transfer on CIFAR-10: test accuracy of the default head by training-set size and image size.

    python benchmarks/linear_probe.py --data data/01_raw/cifar10_jpeg --sizes 32 64 128 --per-class 10 100 1000 4900

Train images are the first N per class of train/ (sorted file names); val is the last 100 per class
of train/ (never used for training); test is the whole test/ folder (10,000 images), touched only
for the final score. The head is the project's default (logistic regression, C chosen on val,
refit on train+val; --no-refit keeps the train-only fit). Features come from the project's extractor and its content-keyed cache, so a
second run only refits heads. Prints one row per (size, N) and a markdown table at the end.
"""

from __future__ import annotations

import argparse
import platform
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from transfer_learning.core.runtime import resolve_device, usable_cores
from transfer_learning.data.index import build_image_index
from transfer_learning.data.settings import DataSettings
from transfer_learning.features.extraction import ExtractionSettings, extract_features
from transfer_learning.models.backbones import BackboneSettings, build_backbone
from transfer_learning.models.heads import HeadSettings, select_and_fit

VAL_PER_CLASS = 100


def split(index, per_class: int):
    train_pool = index[index["location"].str.contains("/train/")].sort_values("location")
    by_class = train_pool.groupby("label", group_keys=False)
    val = by_class.tail(VAL_PER_CLASS)
    train = train_pool.drop(val.index).groupby("label", group_keys=False).head(per_class)
    test = index[index["location"].str.contains("/test/")]
    return train, val, test


def rows_of(part, features: np.ndarray, row_of: dict[str, int]):
    """(features, labels) of the index rows in `part`."""
    return features[[row_of[location] for location in part["location"]]], part["label"].to_numpy()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--data", required=True, help="the CIFAR-10 image folder with train/ and test/"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--per-class", type=int, nargs="+", default=[10, 100, 1000, 4900])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache-dir", default="data/04_feature/cache")
    parser.add_argument(
        "--no-refit",
        action="store_true",
        help="keep the head fitted on train only (the default head refits on train+val after choosing C)",
    )
    return parser.parse_args()


def features_for(index, size: int, args, device):
    """Features of every image any row needs at `size` px, and a (part → arrays) function."""
    backbone = build_backbone(BackboneSettings(image_size=size))
    needed = {}
    for per_class in args.per_class:
        for part in split(index, per_class):
            needed.update(dict.fromkeys(part["location"]))
    locations = sorted(needed)
    settings = ExtractionSettings(
        batch_size=64 if device.type == "cpu" else 512, cache_dir=args.cache_dir
    )
    extracted = extract_features(backbone, locations, settings, device)
    rate = len(locations) / extracted.seconds if extracted.seconds else float("nan")
    print(
        f"{size}px: features for {len(locations)} images in {extracted.seconds:.0f} s ({rate:.0f} img/s){' (cached)' if extracted.cached else ''}"
    )
    row_of = {location: row for row, location in enumerate(locations)}
    return partial(rows_of, features=np.asarray(extracted.features), row_of=row_of)


def score(index, size: int, per_class: int, arrays, refit: bool) -> tuple:
    train, val, test = split(index, per_class)
    start = time.perf_counter()
    fitted = select_and_fit(
        arrays(train), arrays(val), HeadSettings(refit_on_train_val=refit), seed=0
    )
    fit_seconds = time.perf_counter() - start
    test_x, test_y = arrays(test)
    accuracy = float((fitted.model.predict(test_x) == test_y).mean())
    print(
        f"{size}px, {per_class}/class ({len(train)} train, {len(val)} val, {len(test)} test): "
        f"test accuracy {accuracy:.4f}, C={fitted.best_params.get('C')}, fit {fit_seconds:.1f} s"
    )
    return size, per_class, accuracy, fitted.best_params.get("C"), fit_seconds


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(usable_cores())
    index, classes, _ = build_image_index(
        DataSettings(source="imagefolder", path=args.data), seed=0
    )
    card = torch.cuda.get_device_name() if device.type == "cuda" else platform.machine()
    print(
        f"{len(index)} images, {len(classes)} classes; device {device} ({card}), {torch.get_num_threads()} threads"
    )
    rows = []
    for size in args.sizes:
        arrays = features_for(index, size, args, device)
        rows += [score(index, size, n, arrays, not args.no_refit) for n in args.per_class]
    print("\n| image size | train images / class | test accuracy | chosen C | head fit (s) |")
    print("|---:|---:|---:|---:|---:|")
    for size, per_class, accuracy, c, seconds in rows:
        print(f"| {size} | {per_class} | {accuracy * 100:.1f} % | {c} | {seconds:.1f} |")


if __name__ == "__main__":
    Path("data/04_feature").mkdir(parents=True, exist_ok=True)
    main()
