"""Domain adaptation on CIFAR-10 → CIFAR-10-C (severity 5): error of every method per corruption.

    pip install imagecorruptions   # opencv, scikit-image and the frost photographs
    python benchmarks/domain_adaptation.py --cifar10 data/01_raw/cifar10_jpeg \
        --output /tmp/domain_adaptation.md --mcc gaussian_noise,defocus_blur,contrast

Source: the first `--train-per-class` CIFAR-10 training images per class, ingested as the
pipeline does (20 % val drawn). feature_transfer and parameter_transfer are trained with the
shipped defaults (conf/base, every `auto` resolved from the data: EfficientNet-Lite0 at 128 px).
Each target is built from CIFAR-10 *test* images — per class the first `--adapt-per-class`
(unlabelled, to adapt to) and the next `--test-per-class` (the target test) — corrupted with one of
the 15 CIFAR-10-C corruptions at severity 5 (`cifar10_c.py`: CIFAR-10-C's parameters), plus
`clean` (no corruption: the same-distribution safety check). Every method runs through the
pipeline's own node functions with the shipped `adaptation` defaults; MCC (a fine-tune, the
costly one on CPU) on the `--mcc` corruptions only. Baseline in the same run: source-only.
Anchor (RobustBench WRN-28-10, TENT repository): source 43.5 % → BN adaptation 20.4 % → TENT
18.6 % mean error.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from kedro.config import OmegaConfigLoader
from PIL import Image

from transfer_learning.adaptation.registry import METHODS
from transfer_learning.core.strategies import FEATURES
from transfer_learning.data.index import build_image_index, index_target_images, profile_images
from transfer_learning.data.settings import DataSettings
from transfer_learning.models.backbones import BackboneSettings, resolve_image_size
from transfer_learning.pipelines.domain_adaptation import nodes as adaptation
from transfer_learning.pipelines.feature_extraction.nodes import extract_image_features
from transfer_learning.pipelines.feature_transfer.nodes import fit_head, split_features
from transfer_learning.pipelines.templates.network_training.nodes import (
    resolve_recipe,
    split_train_val,
    train_model,
)
from transfer_learning.serving.classifier import probability_matrix

sys.path.insert(0, str(Path(__file__).parent))
from cifar10_c import CORRUPTIONS, corrupt  # noqa: E402

PROJECT = Path(__file__).resolve().parents[1]
FEATURE_METHODS = ("source_only", "target_standardisation", "coral")
NETWORK_METHODS = ("source_only", "adabn", "tent", "mcc")


def shipped_parameters() -> dict:
    """conf/base parameters, as `kedro run` reads them."""
    loader = OmegaConfigLoader(str(PROJECT / "conf"), base_env="base", default_run_env="base")
    return loader["parameters"]


def source_folder(cifar: Path, work: Path, per_class: int) -> Path:
    root = work / "source"
    if root.exists():
        shutil.rmtree(root)
    for folder in sorted((cifar / "train").iterdir()):
        (root / "train" / folder.name).mkdir(parents=True)
        for file in sorted(folder.iterdir())[:per_class]:
            (root / "train" / folder.name / file.name).symlink_to(file.resolve())
    return root


def target_folder(cifar: Path, work: Path, name: str, adapt: int, test: int, seed: int) -> Path:
    """train/ (adapt) and test/ class folders of corrupted CIFAR-10 test images, as PNG."""
    root = work / "targets" / name
    if (root / ".complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for folder in sorted((cifar / "test").iterdir()):
        files = sorted(folder.iterdir())[: adapt + test]
        for position, file in enumerate(files):
            split = "train" if position < adapt else "test"
            pixels = np.asarray(Image.open(file).convert("RGB"))
            if name != "clean":
                pixels = corrupt(pixels, name, rng)
            out = root / split / folder.name / f"{file.stem}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(out)
    (root / ".complete").touch()
    return root


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float((probabilities.argmax(axis=1) == labels).mean())


def main() -> None:  # noqa: PLR0915 (one linear script)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar10", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=PROJECT / "data" / "01_raw" / "cifar10_c")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--adapt-per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--targets", default="clean," + ",".join(CORRUPTIONS))
    parser.add_argument(
        "--mcc", default="", help="targets that also run MCC (comma-separated, or all)"
    )
    args = parser.parse_args()

    params = shipped_parameters()
    seed, device = params["seed"], "cpu"
    params["training"] = {
        **params["training"],
        "progress": False,
        "checkpoint_dir": str(args.work / "checkpoints"),
    }
    params["extraction"] = {**params["extraction"], "progress": False}
    started = time.perf_counter()

    data = {
        **params["data"],
        "source": "imagefolder",
        "path": str(source_folder(args.cifar10, args.work, args.train_per_class)),
    }
    settings = DataSettings.from_params(data)
    index, classes, _ = build_image_index(settings, seed)
    profile = profile_images(index, settings, seed)
    class_names = {"classes": classes}
    backbone = asdict(
        resolve_image_size(
            BackboneSettings.from_params(params["backbone"]), profile["typical_short_side"]
        )
    )
    print(f"source: {len(index)} images ({profile}), backbone {backbone}", flush=True)

    features, _, _ = extract_image_features(
        index, backbone, params["extraction"], device, params["distributed"]
    )
    train_features, val_features = split_features(features)
    head, _, head_summary = fit_head(
        train_features, val_features, {"classes": classes}, params["head"], seed
    )
    train_index, val_index = split_train_val(index)
    recipe = resolve_recipe(
        backbone,
        params["finetune"],
        params.get("parameter_transfer"),
        profile,
        "parameter_transfer",
    )
    checkpoint, summary, _ = train_model(
        train_index,
        val_index,
        class_names,
        recipe,
        params["training"],
        seed,
        device,
        params["distributed"],
        "parameter_transfer",
    )
    source_seconds = time.perf_counter() - started
    print(
        f"source models in {source_seconds:.0f} s: head val {head_summary['val_accuracy']:.4f}, "
        f"fine-tune best val {summary['best_val_accuracy']:.4f} "
        f"({summary['fit_seconds']:.0f} s)",
        flush=True,
    )

    from transfer_learning.core.runtime import resolve_device
    from transfer_learning.features.extraction import ExtractionSettings, extract_features
    from transfer_learning.models.backbones import build_backbone
    from transfer_learning.serving.packaging import network_image_model

    feature_network = build_backbone(BackboneSettings.from_params(backbone))
    extraction = ExtractionSettings.from_params(params["extraction"])
    rows = []
    mcc_targets = set(args.targets.split(",")) if args.mcc == "all" else set(args.mcc.split(","))
    for target in args.targets.split(","):
        began = time.perf_counter()
        root = target_folder(
            args.cifar10, args.work, target, args.adapt_per_class, args.test_per_class, seed
        )
        tdata = {**data, "target_path": str(root)}
        target_index, _ = index_target_images(DataSettings.from_params(tdata), classes, seed)
        images = adaptation.select_adaptation_images(target_index)
        test = target_index[target_index["split"] == "test"].reset_index(drop=True)
        labels = test["label"].to_numpy()
        methods = ["coral", "adabn", "tent"] + (["mcc"] if target in mcc_targets else [])
        adaptation_params = {**params["adaptation"], "methods": methods}
        target_features = adaptation.extract_target_features(
            images, backbone, params["extraction"], device
        )
        shift = adaptation.measure_domain_shift(
            features, target_features, adaptation_params, seed, registry=METHODS
        )
        heads, networks = {"source_only": head}, {"source_only": checkpoint}
        for method in METHODS:
            if method.kind == FEATURES:
                heads.update(
                    adaptation.adapt_head(
                        head, train_features, val_features, target_features, params["head"],
                        adaptation_params, seed, method=method, registry=METHODS,
                    )
                )  # fmt: skip
            else:
                networks.update(
                    adaptation.adapt_network(
                        checkpoint, recipe, train_index, images, adaptation_params, seed, device,
                        method=method, registry=METHODS,
                    )
                )  # fmt: skip
        test_features = np.asarray(
            extract_features(
                feature_network, test["location"].tolist(), extraction, resolve_device(device)
            ).features
        )
        row = {"target": target, "proxy_a_distance": shift["proxy_a_distance"]}
        for method, fitted in heads.items():
            row[f"feature_transfer.{method}"] = 1 - accuracy(
                fitted.predict_proba(test_features), labels
            )
        for method, network in networks.items():
            model = network_image_model(network, class_names, method)
            predictions = model.predict_files(test["location"].tolist())
            probabilities = probability_matrix(predictions)
            row[f"parameter_transfer.{method}"] = 1 - accuracy(probabilities, labels)
        row["seconds"] = time.perf_counter() - began
        rows.append(row)
        print(json.dumps(row), flush=True)

    table = pd.DataFrame(rows).set_index("target")
    report = render(table, args, source_seconds, summary, head_summary)
    print(report)
    if args.output:
        args.output.write_text(report)
        table.to_csv(args.output.with_suffix(".csv"))


def render(
    table: pd.DataFrame, args, source_seconds: float, summary: dict, head_summary: dict
) -> str:
    columns = [f"feature_transfer.{m}" for m in FEATURE_METHODS] + [
        f"parameter_transfer.{m}" for m in NETWORK_METHODS
    ]
    columns = [c for c in columns if c in table]
    header = (
        "| target | A-dist | " + " | ".join(c.replace("_transfer.", "·") for c in columns) + " |"
    )
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}. Source: {args.train_per_class}/class CIFAR-10 train "
        f"(20 % val), models in {source_seconds:.0f} s; targets: {args.adapt_per_class}/class "
        f"to adapt to, {args.test_per_class}/class target test, per corruption.",
        "",
        "Target test **error** (%), lower is better:",
        "",
        header,
        "|---|---:|" + "---:|" * len(columns),
    ]
    for target, row in table.iterrows():
        cells = " | ".join("–" if pd.isna(row.get(c)) else f"{100 * row[c]:.1f}" for c in columns)
        lines.append(f"| {target} | {row['proxy_a_distance']:.2f} | {cells} |")
    corrupted = table.drop(index="clean", errors="ignore")
    if len(corrupted):
        mean = corrupted[columns].mean()
        cells = " | ".join("–" if pd.isna(mean[c]) else f"**{100 * mean[c]:.1f}**" for c in columns)
        lines.append(f"| mean of {len(corrupted)} corruptions | | {cells} |")
        lines += [
            "",
            "Relative cut of the mean error vs source-only (corruptions where the method ran):",
            "",
        ]
        for base in ("feature_transfer", "parameter_transfer"):
            for column in columns:
                if not column.startswith(base) or column.endswith("source_only"):
                    continue
                ran = corrupted[column].notna()
                source = corrupted.loc[ran, f"{base}.source_only"].mean()
                adapted = corrupted.loc[ran, column].mean()
                lines.append(
                    f"- {column}: {100 * source:.1f} % → {100 * adapted:.1f} % "
                    f"({100 * (source - adapted) / source:+.0f} %, {int(ran.sum())} corruptions)"
                )
        if "feature_transfer.coral" in corrupted:
            change = corrupted["feature_transfer.source_only"] - corrupted["feature_transfer.coral"]
            lines.append(
                f"- CORAL accuracy change per corruption: min {100 * change.min():+.1f}, "
                f"mean {100 * change.mean():+.1f} points"
            )
    if "clean" in table.index:
        clean = table.loc["clean"]
        worst = {
            base: max(
                clean[c] - clean[f"{base}.source_only"]
                for c in columns
                if c.startswith(base) and not pd.isna(clean[c])
            )
            for base in ("feature_transfer", "parameter_transfer")
        }
        lines += [
            "",
            f"Same distribution (clean): largest accuracy loss vs source-only "
            f"{100 * worst['feature_transfer']:.1f} points (feature_transfer), "
            f"{100 * worst['parameter_transfer']:.1f} points (parameter_transfer).",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
