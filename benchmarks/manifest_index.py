"""Indexing from a manifest table against indexing the same images as a folder tree.

Writes a CSV manifest of an ImageFolder tree (`train/<class>/…`, `test/<class>/…`: one row per
image with its relative path, its class and its split folder), then indexes the images both ways
with the project's `build_image_index` (headers checked, splits assigned) and prints the wall
time of each, best of `--rounds`.

    python benchmarks/manifest_index.py --data data/01_raw/cifar10_jpeg
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from transfer_learning.data.index import build_image_index
from transfer_learning.data.settings import DataSettings


def write_manifest(root: Path, where: Path) -> int:
    paths = sorted(root.glob("*/*/*"))
    table = pd.DataFrame(
        {
            "path": [str(p.relative_to(root)) for p in paths],
            "label": [p.parent.name for p in paths],
            "split": [p.parent.parent.name for p in paths],
        }
    )
    table.to_csv(where, index=False)
    return len(table)


def best_time(settings: DataSettings, rounds: int) -> tuple[float, int]:
    times, rows = [], 0
    for _ in range(rounds):
        started = time.perf_counter()
        index, _, _ = build_image_index(settings, seed=0)
        times.append(time.perf_counter() - started)
        rows = len(index)
    return min(times), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/01_raw/cifar10_jpeg"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    # In the tree's root, so that its relative paths resolve there; removed afterwards.
    manifest = args.data.resolve() / "manifest_benchmark.csv"
    try:
        n_rows = write_manifest(args.data.resolve(), manifest)
        table_seconds, table_rows = best_time(
            DataSettings(source="manifest", manifest=str(manifest), split_column="split"),
            args.rounds,
        )
    finally:
        manifest.unlink(missing_ok=True)
    folder_seconds, folder_rows = best_time(
        DataSettings(source="imagefolder", path=str(args.data)), args.rounds
    )
    print(f"manifest: {n_rows:,} rows → {table_rows:,} indexed in {table_seconds:.1f} s")
    print(f"folder (baseline, same images): {folder_rows:,} indexed in {folder_seconds:.1f} s")
    print(f"manifest / folder: {table_seconds / folder_seconds:.2f} (target: under 20 s)")


if __name__ == "__main__":
    main()
