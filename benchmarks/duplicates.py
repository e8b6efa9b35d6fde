"""The leakage check on CIFAR-10's own train/test split, against the published near-duplicate rate.

Barz & Denzler (2020, "Do we train on test data? Purging CIFAR of near-duplicates", ciFAIR)
found that 3.3 % of the CIFAR-10 test images have an exact or near duplicate in its training
set. This runs the project's detector (`transfer_learning.data.duplicates.find_duplicates`, what
ingestion runs) on all 60,000 images with CIFAR-10's split (50,000 train, 10,000 test) and prints
the rate it finds beside that figure, and the wall time.

    python benchmarks/duplicates.py --data data/01_raw/cifar10_jpeg [--montage pairs.png]

`--montage` saves test/match pairs sampled at every distance, to judge the matches by eye.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from transfer_learning.data.duplicates import find_duplicates

PUBLISHED_RATE = 0.033  # CIFAR-10 test images with a duplicate in train (ciFAIR)


def cifar_index(root: Path) -> pd.DataFrame:
    rows = [
        {"location": str(path), "class_name": path.parent.name, "split": split}
        for split in ("train", "test")
        for path in sorted((root / split).glob("*/*.jpg"))
    ]
    return pd.DataFrame(rows)


def montage(pairs: pd.DataFrame, where: Path) -> None:
    """Test image | its match, six pairs a row."""
    from PIL import Image

    cell, per_row = 48, 6
    rows = -(-len(pairs) // per_row)
    sheet = Image.new("RGB", (per_row * (2 * cell + 8), rows * cell), "white")
    for k, pair in enumerate(pairs.itertuples()):
        row, column = divmod(k, per_row)
        for side, location in enumerate((pair.test_location, pair.match_location)):
            image = Image.open(location).convert("RGB").resize((cell, cell))
            sheet.paste(image, (column * (2 * cell + 8) + side * cell, row * cell))
    sheet.save(where)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/01_raw/cifar10_jpeg"))
    parser.add_argument("--montage", type=Path, help="save 48 found pairs here (PNG)")
    args = parser.parse_args()

    index = cifar_index(args.data)
    n_test = int((index["split"] == "test").sum())
    started = time.perf_counter()
    found = find_duplicates(index)
    seconds = time.perf_counter() - started
    rate = len(found) / n_test
    print(f"images: {len(index):,} ({len(index) - n_test:,} train, {n_test:,} test), 2 cores")
    print(f"wall time: {seconds:.1f} s")
    print(f"exact (identical files): {(found['kind'] == 'exact').sum()}")
    print(f"near-duplicates: {(found['kind'] == 'near').sum()}")
    print("  by pHash distance:", found["distance_bits"].value_counts().sort_index().to_dict())
    print(f"  same class as the match: {(found['test_class'] == found['match_class']).mean():.1%}")
    print(
        f"detector: {len(found)} test images, {rate:.2%} | published (ciFAIR): "
        f"{PUBLISHED_RATE:.1%} | ratio {rate / PUBLISHED_RATE:.2f} (target 0.67 … 1.5)"
    )
    if args.montage:
        montage(found.sample(min(48, len(found)), random_state=0), args.montage)
        print(f"montage: {args.montage}")


if __name__ == "__main__":
    main()
