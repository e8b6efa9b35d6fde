"""Limited and imbalanced data: learning curves, few-shot heads and long-tail corrections.

    # learning curve (the learning_curve pipeline's own nodes) on an image folder
    python benchmarks/limited_data.py curve --data data/01_raw/flowers \
        --strategies feature_transfer --per-class 1 2 5 10 25 50 100 all --repeats 3
    # prototype vs. logistic regression at few shots (the same nested draws)
    python benchmarks/limited_data.py heads --data data/01_raw/flowers --per-class 1 2 5 10 --repeats 5
    # long-tailed training data (CIFAR-10-LT style), balanced test: plain vs. each correction
    python benchmarks/limited_data.py long-tail --data data/01_raw/cifar10_jpeg --ratio 100 10 \
        --strategies feature_transfer parameter_transfer

Everything runs through the project's code with its shipped defaults (`auto` image size, head
and fine-tuning recipe); the only settings a command changes are the ones it compares. The data
folder's test/ is the test split; val is drawn from train/ by the project's ingestion. Features
come from the project's extractor and its content-keyed cache (extracted once per folder and
size, reused by every point). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from transfer_learning.core.runtime import usable_cores
from transfer_learning.data.index import build_image_index, profile_images
from transfer_learning.data.settings import DataSettings
from transfer_learning.pipelines.feature_extraction.nodes import (
    extract_image_features,
    resolve_backbone,
)
from transfer_learning.pipelines.learning_curve.nodes import (
    draw_curve_subsets,
    finetuning_curve,
    head_curve,
    report_learning_curve,
)
from transfer_learning.reporting.curves import ALL, mean_and_interval

CONF = Path("conf/base")


def shipped(name: str) -> dict:
    """A block of the shipped parameters (conf/base), as a `kedro run` would get it."""
    for path in sorted(CONF.glob("parameters*.yml")):
        block = (yaml.safe_load(path.read_text()) or {}).get(name)
        if block is not None:
            return block
    raise KeyError(name)


def resolved_backbone(
    index: pd.DataFrame, profile: dict, seed: int, overrides: dict | None = None
) -> dict:
    """The shipped `backbone` block (with `overrides` over it), every `auto` resolved by the
    pipelines' own node; `name: auto` ranks photos' candidates on the spot (features cached)."""
    block = {**shipped("backbone"), **(overrides or {})}
    selection, extraction = shipped("selection"), shipped("extraction")
    backbone, _ = resolve_backbone(block, profile, index, None, selection, extraction, seed, "auto")
    return backbone


def prepare(data: str, seed: int, imbalance_ratio: float | None = None, backbone=None):
    """Index, profile, resolved backbone and features of the folder, as the pipelines make them
    (`backbone`: keys over the shipped block, for features and fine-tuning alike)."""
    settings = DataSettings(source="imagefolder", path=data, imbalance_ratio=imbalance_ratio)
    index, classes, _ = build_image_index(settings, seed)
    profile = profile_images(index, settings, seed)
    backbone = resolved_backbone(index, profile, seed, backbone)
    extraction = {**shipped("extraction"), "progress": False}
    start = time.perf_counter()
    # Every image of the folder in sorted order (one cache entry per folder and size, shared by
    # every ratio and by benchmarks/linear_probe.py), then the index's rows picked out.
    folder = sorted(
        build_image_index(DataSettings(source="imagefolder", path=data), seed)[0]["location"]
    )
    every = pd.DataFrame({"location": folder, "label": 0, "split": "train"})
    extracted, _, _ = extract_image_features(every, backbone, extraction, "auto", {})
    row_of = {location: row for row, location in enumerate(folder)}
    features = {
        **extracted,
        "features": extracted["features"][[row_of[loc] for loc in index["location"]]],
        "label": index["label"].to_numpy(np.int64),
        "split": index["split"].to_numpy(str),
        "location": index["location"].to_numpy(str),
    }
    print(
        f"{data}: {len(index)} images, {len(classes)} classes, "
        f"{dict(index['split'].value_counts())}; {backbone['name']} at {backbone['image_size']} px; "
        f"features in {time.perf_counter() - start:.0f} s"
    )
    return index, {"classes": classes}, profile, backbone, features


def curve(args) -> None:
    index, class_names, profile, backbone, features = prepare(
        args.data, args.seed, backbone=args.backbone
    )
    params = {"per_class": args.per_class, "repeats": args.repeats, "strategies": args.strategies}
    subsets = draw_curve_subsets(index, params, args.seed)
    frames = []
    start = time.perf_counter()
    frames.append(
        head_curve(
            features, subsets, class_names, shipped("head"), params, strategy="feature_transfer"
        )
    )
    print(f"feature_transfer curve: {time.perf_counter() - start:.1f} s after extraction")
    for strategy in ("parameter_transfer", "structure_transfer"):
        start = time.perf_counter()
        finetune = {**shipped("finetune"), **(args.finetune or {})}
        training = {**shipped("training"), "progress": False}
        frames.append(
            finetuning_curve(
                subsets,
                index,
                class_names,
                backbone,
                finetune,
                None,
                profile,
                training,
                params,
                args.seed,
                "auto",
                strategy=strategy,
            )
        )
        if not frames[-1].empty:
            print(f"{strategy} curve: {time.perf_counter() - start:.1f} s")
    runs, _, markdown, figure = report_learning_curve(index, *frames)
    print(markdown)
    if args.output:
        runs.to_csv(f"{args.output}.csv", index=False)
        Path(f"{args.output}.md").write_text(markdown)
        figure.savefig(f"{args.output}.png", dpi=120)


def heads(args) -> None:
    """Prototype vs. logistic regression vs. auto, same draws, scored on the same test split."""
    index, class_names, _, _, features = prepare(args.data, args.seed)
    params = {
        "per_class": args.per_class,
        "repeats": args.repeats,
        "strategies": ["feature_transfer"],
    }
    subsets = draw_curve_subsets(index, params, args.seed)
    rows = []
    for head_type in ("prototype", "logistic_regression", "auto"):
        frame = head_curve(
            features,
            subsets,
            class_names,
            {**shipped("head"), "type": head_type},
            params,
            strategy="feature_transfer",
        )
        rows.append(frame.assign(head_setting=head_type))
    table = pd.concat(rows)
    print("\n| per class | head.type | test accuracy (mean, 95 % interval) | runs | chose |")
    print("|---:|---|---|---:|---|")
    for (per_class, setting), group in table.groupby(["per_class", "head_setting"], sort=False):
        mean, half = mean_and_interval(group["accuracy"].to_numpy())
        chose = ", ".join(f"{k} {v}" for k, v in group["head"].value_counts().items())
        print(
            f"| {per_class} | {setting} | {mean * 100:.1f} % ({(mean - half) * 100:.1f}–"
            f"{(mean + half) * 100:.1f}) | {len(group)} | {chose} |"
        )


# What each long-tail correction sets, on top of the shipped defaults.
HEAD_CORRECTIONS = {
    "plain": {},
    "class_weight": {"class_weight": "balanced"},
    "logit_adjustment": {"logit_adjustment": 1.0},
}
FINETUNE_CORRECTIONS = {
    "plain": {},
    "class_weight": {"class_weight": "balanced"},
    "balanced_softmax": {"loss": "balanced_softmax"},
    "class_balanced_sampling": {"sampling": "class_balanced"},
}


def long_tail(args) -> None:
    results = []
    for ratio in args.ratio:
        index, class_names, profile, backbone, features = prepare(args.data, args.seed, ratio)
        counts = index[index["split"] != "test"]["label"].value_counts().sort_index()
        print(f"ratio {ratio}: train+val per class {counts.tolist()}")
        full = {"per_class": [ALL], "repeats": 1}
        subsets = draw_curve_subsets(index, {**full, "strategies": args.strategies}, args.seed)
        if "feature_transfer" in args.strategies:
            for name, correction in HEAD_CORRECTIONS.items():
                start = time.perf_counter()
                frame = head_curve(
                    features,
                    subsets,
                    class_names,
                    {**shipped("head"), **correction},
                    {**full, "strategies": ["feature_transfer"]},
                    strategy="feature_transfer",
                )
                results.append(_row(ratio, "feature_transfer", name, frame, start))
        if "parameter_transfer" in args.strategies:
            for name in args.finetune_corrections:
                start = time.perf_counter()
                frame = finetuning_curve(
                    subsets,
                    index,
                    class_names,
                    backbone,
                    {**shipped("finetune"), **FINETUNE_CORRECTIONS[name]},
                    None,
                    profile,
                    {**shipped("training"), "progress": False},
                    {**full, "strategies": ["parameter_transfer"]},
                    args.seed,
                    "auto",
                    strategy="parameter_transfer",
                )
                results.append(_row(ratio, "parameter_transfer", name, frame, start))
    print(
        "\n| imbalance ratio | strategy | correction | balanced test accuracy | accuracy | seconds |"
    )
    print("|---:|---|---|---:|---:|---:|")
    for row in results:
        print(
            f"| {row['ratio']} | {row['strategy']} | {row['correction']} | "
            f"{row['balanced_accuracy'] * 100:.1f} % | {row['accuracy'] * 100:.1f} % | "
            f"{row['seconds']:.0f} |"
        )


def _row(ratio, strategy, correction, frame, start) -> dict:
    row = {
        "ratio": ratio,
        "strategy": strategy,
        "correction": correction,
        "balanced_accuracy": float(frame["balanced_accuracy"].iloc[0]),
        "accuracy": float(frame["accuracy"].iloc[0]),
        "seconds": time.perf_counter() - start,
    }
    print(row, flush=True)
    return row


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("curve", "heads", "long-tail"):
        command = commands.add_parser(name)
        command.add_argument("--data", required=True, help="a folder with train/ and test/")
        command.add_argument("--seed", type=int, default=42)
        command.add_argument(
            "--per-class",
            nargs="+",
            default=[1, 2, 5, 10, 25, 50, 100, ALL],
            type=lambda value: value if value == ALL else int(value),
        )
        command.add_argument("--repeats", type=int, default=3)
        command.add_argument(
            "--strategies", nargs="+", default=["feature_transfer", "parameter_transfer"]
        )
        command.add_argument("--ratio", type=float, nargs="+", default=[100.0])
        command.add_argument(
            "--finetune-corrections", nargs="+", default=list(FINETUNE_CORRECTIONS)
        )
        command.add_argument(
            "--backbone", type=yaml.safe_load, help="keys over the resolved backbone (YAML)"
        )
        command.add_argument(
            "--finetune", type=yaml.safe_load, help="keys over the shipped finetune block (YAML)"
        )
        command.add_argument("--output", help="curve: write <output>.csv, .md and .png")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(usable_cores())
    print(
        f"{platform.node()} {platform.machine()}, {usable_cores()} cores, torch "
        f"{torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    {"curve": curve, "heads": heads, "long-tail": long_tail}[args.command](args)


if __name__ == "__main__":
    main()
