"""How well do transferability scores pick the backbone? Ranked by each score, checked on test.

    python benchmarks/backbone_selection.py --flowers data/01_raw/flowers \
        --cifar10 data/01_raw/cifar10_jpeg --output /tmp/backbone_selection.md --finetune-top 3

For each data set the project's own ingestion (default 20 % val draw) and `rank_backbones`
(default candidates: EfficientNet-Lite0/1/2 at their auto size and ¾ of it, plus random-weight
controls) run as `kedro run --pipelines=backbone_selection` would. Then, as ground truth, each
pretrained candidate's feature_transfer head (default selection, refit on train+val) is scored
on the test split, which the ranking never saw, and the best `--finetune-top` candidates by probe
get the short fine-tune of `selection.finetune` (100 steps; best val accuracy). Printed side by side with two baselines from the
same run: the project's default (efficientnet_lite0 at auto size) and ranking by parameter count.
CIFAR-10 100/class: the first 125 training images per class (100 train + 25 val), all 10,000
test images.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import kendalltau

from transfer_learning.data.index import build_image_index, profile_images
from transfer_learning.data.settings import DataSettings
from transfer_learning.features.extraction import ExtractionSettings, extract_features
from transfer_learning.features.selection import (
    Candidate,
    SelectionSettings,
    markdown_table,
    rank_backbones,
    selection_images,
    short_finetune_accuracy,
)
from transfer_learning.features.transferability import SCORES
from transfer_learning.models.backbones import BackboneSettings, build_backbone
from transfer_learning.models.heads import HeadSettings, select_and_fit

sys.path.insert(0, str(Path(__file__).parent))
from scoreboard import subset  # noqa: E402

EXTRACTION = ExtractionSettings(cache_dir="data/04_feature/cache", progress=False)
CPU = torch.device("cpu")


def test_accuracy(name: str, image_size: int, index: pd.DataFrame) -> tuple[float, int]:
    """Test accuracy of the default feature_transfer head on this backbone, and its size."""
    backbone = build_backbone(BackboneSettings(name, image_size))
    features = np.asarray(
        extract_features(backbone, index["location"].tolist(), EXTRACTION, CPU).features
    )
    labels = index["label"].to_numpy()
    part = {split: (index["split"] == split).to_numpy() for split in ("train", "val", "test")}
    head = select_and_fit(
        (features[part["train"]], labels[part["train"]]),
        (features[part["val"]], labels[part["val"]]),
        HeadSettings(),
        seed=42,
    )
    accuracy = float(np.mean(head.model.predict(features[part["test"]]) == labels[part["test"]]))
    size = sum(p.numel() for p in backbone.features.parameters())
    return accuracy, size


def benchmark(name: str, folder: Path, finetune_top: int) -> str:
    settings = DataSettings(source="imagefolder", path=str(folder))
    index, _, _ = build_image_index(settings, seed=42)
    profile = profile_images(index, settings, seed=42)
    start = time.perf_counter()
    ranking = rank_backbones(index, profile, SelectionSettings(), EXTRACTION, CPU, seed=42)
    ranking_seconds = time.perf_counter() - start
    pretrained = ranking[ranking["pretrained"]].copy()
    truth = [test_accuracy(r.name, int(r.image_size), index) for r in pretrained.itertuples()]
    pretrained["test_accuracy"] = [accuracy for accuracy, _ in truth]
    pretrained["parameters"] = [size for _, size in truth]
    best = pretrained["test_accuracy"].max()
    # A short fine-tune (selection.finetune, 100 steps) of the best candidates by probe.
    rows, _ = selection_images(index, SelectionSettings().max_images, seed=42)
    top = pretrained.nlargest(finetune_top, "probe_accuracy")
    pretrained["finetune_val_accuracy"] = [
        short_finetune_accuracy(Candidate(r.name, int(r.image_size)), rows, profile, 100, CPU, 42)
        if r.candidate in set(top["candidate"])
        else np.nan
        for r in pretrained.itertuples()
    ]

    rows = []
    for method in [*SCORES, "probe_accuracy", "parameters"]:
        values = pretrained[method].to_numpy(dtype=float)
        pick = pretrained.iloc[int(np.argmax(values))]
        rows.append(
            {
                "ranked by": method,
                "τ vs test": kendalltau(values, pretrained["test_accuracy"]).statistic,
                "pick": pick["candidate"],
                "pick test acc": pick["test_accuracy"],
                "regret (points)": 100 * (best - pick["test_accuracy"]),
                "controls below every pretrained": bool(
                    ranking.loc[~ranking["pretrained"], method].max() < values.min()
                )
                if method in SCORES
                else None,
            }
        )
    default = pretrained[pretrained["name"] == "efficientnet_lite0"].iloc[0]
    rows.append(
        {
            "ranked by": "project default (lite0, auto size)",
            "pick": default["candidate"],
            "pick test acc": default["test_accuracy"],
            "regret (points)": 100 * (best - default["test_accuracy"]),
        }
    )
    scoring = ranking["scoring_seconds"].sum()
    extraction = ranking["extraction_seconds"].sum()
    share = f"{scoring / extraction:.1%}" if extraction else "n/a: features were cached"
    columns = [
        "candidate",
        *SCORES,
        "probe_accuracy",
        "finetune_val_accuracy",
        "test_accuracy",
        "parameters",
    ]
    extra = ["candidate", "finetune_val_accuracy", "test_accuracy", "parameters"]
    shown = ranking.merge(pretrained[extra], how="left")
    return "\n".join(
        [
            f"## {name} ({len(index)} images; train+val {int((index['split'] != 'test').sum())}, "
            f"test {int((index['split'] == 'test').sum())})",
            "",
            markdown_table(shown[columns]),
            "",
            markdown_table(pd.DataFrame(rows)),
            "",
            f"Scoring all candidates: {scoring:.1f} s; extracting their features: "
            f"{extraction:.1f} s ({share} of extraction; features cached "
            f"before: {int(ranking['features_cached'].sum())} of {len(ranking)}). "
            f"Whole ranking incl. probes: {ranking_seconds:.0f} s.",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flowers", type=Path)
    parser.add_argument("--cifar10", type=Path)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--finetune-top", type=int, default=3, help="short fine-tunes (0: none)")
    args = parser.parse_args()
    sections = [
        "# Backbone selection benchmark",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        "threads, CPU only. Produced by `benchmarks/backbone_selection.py`.",
        "",
    ]
    with tempfile.TemporaryDirectory() as scratch:
        sets = []
        if args.cifar10:
            sets.append(
                ("CIFAR-10, 100/class", subset(args.cifar10, Path(scratch) / "cifar10_100", 125))
            )
        if args.flowers:
            sets.append(("flower photos (5 classes)", args.flowers))
        for name, folder in sets:
            sections.append(benchmark(name, folder, args.finetune_top))
            print(sections[-1], flush=True)
            if args.output:
                args.output.write_text("\n".join(sections))


if __name__ == "__main__":
    main()
