"""Fine-tuning throughput and accuracy per epoch, next to a bare forward+backward loop.

    python benchmarks/fine_tuning.py --data data/01_raw/cifar10_jpeg --per-class 100 --image-size 32 --epochs 3

Train: the first N images per class of train/; val: the last 50 per class of train/. For each
strategy (parameter_transfer full with its default frozen early layers and with every layer
trained, parameter_transfer lp_ft, structure_transfer) it prints val accuracy per epoch and the
training throughput (train steps only, decoding and augmentation included), then the bare loop:
the same model, AdamW, forward+loss+backward+step of every layer on normalised tensors already
in memory, each in a fresh process: with glibc's default allocator and with the heap the trainer
keeps (`runtime.keep_freed_memory`). The last lines read
`frozen early layers: X img/s | every layer: Y img/s | ratio: R`,
`bare loop, glibc default: X img/s | heap kept: Y img/s | ratio: R` and
`project: X img/s | bare loop: Y img/s | project/bare: R` (parameter_transfer, every layer, against
the bare loop with the heap kept as the project keeps it).
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import resource
import time

import torch
from torch import nn

from transfer_learning.core.runtime import keep_freed_memory, resolve_device, usable_cores
from transfer_learning.data.index import build_image_index
from transfer_learning.data.settings import DataSettings
from transfer_learning.models.backbones import BackboneSettings
from transfer_learning.models.classifier import build_classifier
from transfer_learning.training.recipe import (
    FinetuneSettings,
    Recipe,
    TrainingRunSettings,
    TrainValImages,
)
from transfer_learning.training.trainer import train_classifier

# name: (pretrained weights?, finetune keys)
STRATEGIES = {
    "parameter_transfer (full)": (True, {"mode": "full"}),
    "parameter_transfer (full, every layer)": (True, {"mode": "full", "freeze_stride": None}),
    "parameter_transfer (lp_ft)": (True, {"mode": "lp_ft", "lp_epochs": 1}),
    "structure_transfer": (False, {"mode": "full", "lr": 0.003}),
}


def bare_loop_in_fresh_process(
    image_size: int, batch_size: int, device: str, keep_heap: bool
) -> tuple[float, float]:
    """The bare loop's img/s and the share of its CPU time spent in the kernel."""
    if keep_heap:
        keep_freed_memory()
    torch.set_num_threads(usable_cores())
    before = resource.getrusage(resource.RUSAGE_SELF)
    rate = bare_loop(image_size, batch_size, torch.device(device))
    after = resource.getrusage(resource.RUSAGE_SELF)
    system = after.ru_stime - before.ru_stime
    return rate, system / (system + after.ru_utime - before.ru_utime)


def bare_loop(
    image_size: int, batch_size: int, device: torch.device, seconds: float = 15.0
) -> float:
    model, _ = build_classifier(BackboneSettings(image_size=image_size), 10, seed=0)
    model = model.to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(
        memory_format=torch.channels_last
    )
    targets = torch.randint(0, 10, (batch_size,), device=device)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images), targets).backward()
        optimizer.step()

    for _ in range(3):
        step()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        done += batch_size
    if device.type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", required=True)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    return parser.parse_args()


def train_val_images(data: str, per_class: int) -> TrainValImages:
    index, _, _ = build_image_index(DataSettings(source="imagefolder", path=data), seed=0)
    pool = index[index["location"].str.contains("/train/")].sort_values("location")
    val = pool.groupby("label", group_keys=False).tail(50)
    train = pool.drop(val.index).groupby("label", group_keys=False).head(per_class)
    return TrainValImages(
        train["location"].tolist(),
        train["label"].to_numpy(),
        val["location"].tolist(),
        val["label"].to_numpy(),
    )


def train_strategy(name: str, images: TrainValImages, args, device) -> float:
    """Train one strategy; print its val accuracy per epoch; return its training img/s."""
    pretrained, keys = STRATEGIES[name]
    finetune = {"epochs": args.epochs, "batch_size": args.batch_size, "patience": None}
    recipe = Recipe(
        BackboneSettings(image_size=args.image_size, pretrained=pretrained),
        FinetuneSettings(
            **{
                **finetune,
                "hflip": True,
                "freeze_stride": FinetuneSettings().frozen_stride(pretrained),  # as auto resolves
                **keys,
            }
        ),
    )
    run = TrainingRunSettings(checkpoint_dir="data/06_models/checkpoints/benchmark", progress=False)
    result = train_classifier(images, 10, recipe, run, 0, device, "benchmark")
    per_epoch = ", ".join(f"{row['val_accuracy']:.3f}" for row in result.history)
    rows = result.history
    trained = sum(row["train_images_per_second"] for row in rows) / len(rows)
    print(
        f"{name}: val accuracy per epoch [{per_epoch}], training {trained:.0f} img/s, {result.fit_seconds:.0f} s in all"
    )
    return trained


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(usable_cores())
    images = train_val_images(args.data, args.per_class)
    card = torch.cuda.get_device_name() if device.type == "cuda" else platform.machine()
    print(
        f"{len(images.train_locations)} train, {len(images.val_locations)} val images at "
        f"{args.image_size}px, batch {args.batch_size}, device {device} ({card}), "
        f"{torch.get_num_threads()} threads"
    )
    bare_rates = {}
    for keep_heap in (False, True):  # fresh processes: the allocator setting is process-wide
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            bare_rates[keep_heap] = pool.apply(
                bare_loop_in_fresh_process,
                (args.image_size, args.batch_size, str(device), keep_heap),
            )
    rates = {name: train_strategy(name, images, args, device) for name in STRATEGIES}
    (default, default_system), (bare, kept_system) = bare_rates[False], bare_rates[True]
    print(
        f"bare loop, glibc default: {default:.0f} img/s ({default_system:.0%} of CPU time in the "
        f"kernel) | heap kept: {bare:.0f} img/s ({kept_system:.0%}) | ratio: {bare / default:.2f}"
    )
    project = rates["parameter_transfer (full, every layer)"]
    frozen = rates["parameter_transfer (full)"]
    print(f"bare loop: {bare:.0f} img/s")
    print(
        f"frozen early layers: {frozen:.0f} img/s | every layer: {project:.0f} img/s | ratio: {frozen / project:.2f}"
    )
    print(
        f"project: {project:.0f} img/s | bare loop: {bare:.0f} img/s | project/bare: {project / bare:.2f}"
    )


if __name__ == "__main__":
    main()
