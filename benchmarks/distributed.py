"""One process against several (torch.distributed, gloo on CPU / NCCL on GPUs) on the same work.

    python benchmarks/distributed.py --data data/01_raw/cifar10_jpeg/test --limit 2000 --processes 2

(a) feature extraction of --limit images (cache off), 1 process vs --processes processes; the
    features are compared element for element;
(b) fine-tuning (mode full, --epochs epochs, batch 32, at --image-size px) on --limit images with
    a fifth of them as val, 1 process vs --processes processes: wall time and best val accuracy.
Wall times include starting the worker processes. The last line reads:
extraction 1: X s | N: Y s | speed-up S | identical: B || fine-tuning 1: X s (val A) | N: Y s (val B)
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import numpy as np
import torch
from torchvision import datasets

from transfer_learning.core.distributed import DistributedSettings
from transfer_learning.core.runtime import resolve_device
from transfer_learning.features.extraction import ExtractionSettings, extract_features
from transfer_learning.models.backbones import BackboneSettings, build_backbone
from transfer_learning.training.recipe import (
    FinetuneSettings,
    Recipe,
    TrainingRunSettings,
    TrainValImages,
)
from transfer_learning.training.trainer import train_classifier


def timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", required=True, help="an image folder (one sub-folder per class)")
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {device}"
    )

    folder = datasets.ImageFolder(args.data)
    order = np.random.default_rng(0).permutation(len(folder.samples))[: args.limit]
    files = [folder.samples[i][0] for i in order]
    labels = np.array([folder.samples[i][1] for i in order])
    several = DistributedSettings(nproc_per_node=args.processes)
    one = DistributedSettings()

    backbone = build_backbone(BackboneSettings(image_size=args.image_size))
    settings = ExtractionSettings(batch_size=64, cache_dir=None, progress=False)
    single, single_s = timed(lambda: extract_features(backbone, files, settings, device, one))
    split, split_s = timed(lambda: extract_features(backbone, files, settings, device, several))
    identical = bool(np.array_equal(single.features, split.features))
    print(f"extraction: 1 process {single_s:.1f} s, {args.processes}: {split_s:.1f} s", flush=True)

    n_val = len(files) // 5
    images = TrainValImages(files[n_val:], labels[n_val:], files[:n_val], labels[:n_val])
    recipe = Recipe(
        BackboneSettings(image_size=args.image_size),
        FinetuneSettings(
            epochs=args.epochs, batch_size=32, patience=None, hflip=True, freeze_stride=4
        ),
    )

    def train(distributed: DistributedSettings):
        run = TrainingRunSettings(checkpoint_dir=tempfile.mkdtemp(), progress=False)
        return train_classifier(
            images, len(folder.classes), recipe, run, 0, device, "benchmark", distributed
        )

    trained_one, train_one_s = timed(lambda: train(one))
    trained_several, train_several_s = timed(lambda: train(several))
    print(
        f"extraction 1: {single_s:.1f} s | {args.processes}: {split_s:.1f} s | speed-up "
        f"{single_s / split_s:.2f} | identical: {identical} || fine-tuning 1: {train_one_s:.1f} s "
        f"(val {trained_one.best_val_accuracy:.4f}) | {args.processes}: {train_several_s:.1f} s "
        f"(val {trained_several.best_val_accuracy:.4f}) | speed-up "
        f"{train_one_s / train_several_s:.2f}"
    )


if __name__ == "__main__":
    main()
