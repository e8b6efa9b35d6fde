"""Does sharing help? One multi-task parameter_transfer model vs one single-task model per task.

    python benchmarks/multi_task.py --data data/01_raw/cifar10_jpeg --tasks cifar10 --train-per-class 500 --image-size 96
    python benchmarks/multi_task.py --data data/01_raw/flowers --tasks flowers --image-size 112

Builds a manifest from an image folder (train/<class>/, test/<class>/) with two label columns:
the folder's class, and a coarser label derived from it (`--tasks cifar10`: animal or vehicle;
`--tasks flowers`: the botanical family, Asteraceae for daisy, dandelion and sunflowers, Rosaceae
for roses, Liliaceae for tulips). Val is drawn once (seeded, stratified, 20 % of train) and
written into the manifest's split column, so every model sees the same train, val and test.

Then, with the project's own nodes (`data.source: manifest` indexing, `train_model`, packaging,
`score_test_split`, `evaluate_test_predictions`) and the default `auto` recipe, it trains
(a) one single-task model per label column and (b) one multi-task model on both columns,
and prints per task the test accuracy of each, the total training time and the total size of
the served model folders.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import yaml
from sklearn.model_selection import train_test_split

from transfer_learning.core.runtime import usable_cores
from transfer_learning.data.index import build_task_index, profile_images
from transfer_learning.data.settings import DataSettings
from transfer_learning.pipelines.evaluation.nodes import evaluate_test_predictions
from transfer_learning.pipelines.templates.network_training.nodes import (
    package_network_model,
    resolve_recipe,
    train_model,
)
from transfer_learning.serving.packaging import save_image_model
from transfer_learning.serving.scoring import score_test_split

COARSE = {
    "cifar10": (
        "kind",
        {
            "airplane": "vehicle",
            "automobile": "vehicle",
            "ship": "vehicle",
            "truck": "vehicle",
            "bird": "animal",
            "cat": "animal",
            "deer": "animal",
            "dog": "animal",
            "frog": "animal",
            "horse": "animal",
        },
    ),
    "flowers": (
        "family",
        {
            "daisy": "Asteraceae",
            "dandelion": "Asteraceae",
            "sunflowers": "Asteraceae",
            "roses": "Rosaceae",
            "tulips": "Liliaceae",
        },
    ),
}
STRATEGY = "parameter_transfer"


def build_manifest(args: argparse.Namespace, where: Path) -> tuple[Path, list[str]]:
    coarse, of_class = COARSE[args.tasks]
    rows = []
    for split in ("train", "test"):
        limit = args.train_per_class if split == "train" else args.test_per_class
        for folder in sorted((Path(args.data) / split).iterdir()):
            files = sorted(folder.iterdir())[:limit] if limit else sorted(folder.iterdir())
            rows += [
                {
                    "path": str(f.resolve()),
                    "class": folder.name,
                    coarse: of_class[folder.name],
                    "split": split,
                }
                for f in files
            ]
    table = pd.DataFrame(rows)
    train = table.index[table["split"] == "train"]
    _, val = train_test_split(
        train, test_size=0.2, stratify=table.loc[train, "class"], random_state=args.seed
    )
    table.loc[val, "split"] = "val"
    table.to_csv(where, index=False)
    return where, ["class", coarse]


def run(
    label_columns: list[str],
    manifest: Path,
    args: argparse.Namespace,
    out: Path,
    task_weights: str = "equal",
) -> dict:
    data = {
        "source": "manifest",
        "manifest": str(manifest),
        "label_columns": label_columns,
        "split_column": "split",
    }
    settings = DataSettings.from_params(data)
    index, tasks, _ = build_task_index(settings, args.seed)
    profile = profile_images(index, settings, args.seed)
    class_names = tasks.to_class_names()
    backbone = {
        "name": "efficientnet_lite0",
        "image_size": args.image_size or "auto",
        "pretrained": True,
    }
    finetune = {**args.finetune, "task_weights": task_weights}
    recipe = resolve_recipe(backbone, finetune, {}, profile, STRATEGY)
    train, val = (index[index["split"] == s].reset_index(drop=True) for s in ("train", "val"))
    started = time.perf_counter()
    checkpoint, summary, _ = train_model(
        train,
        val,
        class_names,
        recipe,
        {"checkpoint_dir": str(out / "checkpoints"), "progress": False},
        args.seed,
        args.device,
        {},
        STRATEGY,
    )
    seconds = time.perf_counter() - started
    model = package_network_model(checkpoint, class_names, STRATEGY)
    folder = out / ("model_" + "_".join(label_columns) + "_" + task_weights)
    save_image_model(model, folder)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    test = index[index["split"] == "test"].reset_index(drop=True)
    report, *_ = evaluate_test_predictions(
        score_test_split(model, test), summary, class_names, STRATEGY
    )
    accuracy = (
        {task: values["accuracy"] for task, values in report["tasks"].items()}
        if "tasks" in report
        else {label_columns[0]: report["accuracy"]}
    )
    print(
        f"  {'+'.join(label_columns):>14}{' (' + task_weights + ')' if len(label_columns) > 1 else ''}: "
        + ", ".join(f"{task} {value * 100:.2f} %" for task, value in accuracy.items())
        + (
            f" | loss weights {[round(t['loss_weight'], 2) for t in summary['tasks'].values()]}"
            if "tasks" in summary
            else ""
        )
        + f" | train {seconds:.0f} s ({summary['epochs_run']} epochs, batch "
        f"{recipe.finetune.batch_size}, {recipe.backbone.image_size} px) | model {size / 1e6:.1f} MB",
        flush=True,
    )
    return {
        "accuracy": accuracy,
        "seconds": seconds,
        "bytes": size,
        "n": {s: int((index["split"] == s).sum()) for s in ("train", "val", "test")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", required=True)
    parser.add_argument("--tasks", choices=sorted(COARSE), required=True)
    parser.add_argument("--train-per-class", type=int, default=None)
    parser.add_argument("--test-per-class", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None, help="default: auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--task-weights", default="equal", help="comma-separated finetune.task_weights to run"
    )
    args = parser.parse_args()
    # The shipped recipe (every `auto` resolved from the data, as a kedro run resolves it).
    shipped = Path(__file__).parents[1] / "conf/base/parameters_finetune.yml"
    args.finetune = yaml.safe_load(shipped.read_text())["finetune"]
    print(
        f"{platform.processor() or platform.machine()}, {usable_cores()} cores, torch "
        f"{torch.__version__}, CUDA: {torch.cuda.is_available()}"
    )
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        manifest, columns = build_manifest(args, out / "manifest.csv")
        print(f"Manifest {args.tasks}: tasks {columns}")
        single = {column: run([column], manifest, args, out) for column in columns}
        multis = {
            weights: run(columns, manifest, args, out, weights)
            for weights in args.task_weights.split(",")
        }
    single_seconds = sum(r["seconds"] for r in single.values())
    single_bytes = sum(r["bytes"] for r in single.values())
    print(f"images: {next(iter(multis.values()))['n']}")
    for weights, multi in multis.items():
        print(f"multi-task with task_weights={weights}:")
        print("task | single-task | multi-task | multi − single (points)")
        for column in columns:
            a, b = single[column]["accuracy"][column], multi["accuracy"][column]
            print(f"{column} | {a * 100:.2f} % | {b * 100:.2f} % | {(b - a) * 100:+.2f}")
        print(
            f"training time: single-task models {single_seconds:.0f} s total | multi-task "
            f"{multi['seconds']:.0f} s | multi/single {multi['seconds'] / single_seconds:.2f}"
        )
        print(
            f"served models: {len(single)} single-task {single_bytes / 1e6:.1f} MB | one "
            f"multi-task {multi['bytes'] / 1e6:.1f} MB | multi/single "
            f"{multi['bytes'] / single_bytes:.2f}"
        )


if __name__ == "__main__":
    main()
