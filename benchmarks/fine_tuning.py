"""Fine-tuning throughput and accuracy per epoch, next to a bare forward+backward loop.

    python benchmarks/fine_tuning.py --data data/01_raw/cifar10_jpeg --per-class 100 --image-size 32 --epochs 3

Train: the first N images per class of train/; val: the last 50 per class of train/. For each
strategy (parameter_transfer full, parameter_transfer lp_ft, structure_transfer) it prints val
accuracy per epoch and the training throughput (train steps only, decoding and augmentation
included), then the bare loop: the same model, AdamW, forward+loss+backward+step on normalised
tensors already in memory. The last line reads
`project: X img/s | bare loop: Y img/s | project/bare: R` (parameter_transfer, full).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch import nn

from transfer_learning.backbones import BackboneSettings
from transfer_learning.extraction import configure_cpu_threads, resolve_device
from transfer_learning.finetune import FinetuneSettings, build_classifier, train_classifier
from transfer_learning.image_index import DataSettings, build_image_index

STRATEGIES = {
    "parameter_transfer (full)": {"init": "pretrained", "strategy": "full"},
    "parameter_transfer (lp_ft)": {"init": "pretrained", "strategy": "lp_ft", "lp_epochs": 1},
    "structure_transfer": {"init": "random", "strategy": "full", "lr": 0.003},
}


def bare_loop(
    image_size: int, batch_size: int, device: torch.device, seconds: float = 15.0
) -> float:
    model, _ = build_classifier(
        BackboneSettings(image_size=image_size), FinetuneSettings(), 10, seed=0
    )
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", required=True)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = resolve_device(args.device)
    if device.type == "cpu":
        configure_cpu_threads()
    index, _, _ = build_image_index(DataSettings(source="imagefolder", path=args.data), seed=0)
    pool = index[index["location"].str.contains("/train/")].sort_values("location")
    val = pool.groupby("label", group_keys=False).tail(50)
    train = pool.drop(val.index).groupby("label", group_keys=False).head(args.per_class)
    card = torch.cuda.get_device_name() if device.type == "cuda" else platform.machine()
    print(
        f"{len(train)} train, {len(val)} val images at {args.image_size}px, batch {args.batch_size}, "
        f"device {device} ({card}), {torch.get_num_threads()} threads"
    )
    rates = {}
    for name, overrides in STRATEGIES.items():
        settings = FinetuneSettings(
            **{
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "patience": None,
                "progress": False,
                "hflip": True,
                "checkpoint_dir": "data/06_models/checkpoints/benchmark",
                **overrides,
            }
        )
        result = train_classifier(
            (train["location"].tolist(), val["location"].tolist()),
            (train["label"].to_numpy(), val["label"].to_numpy()),
            10,
            BackboneSettings(image_size=args.image_size),
            settings,
            0,
            device,
            "benchmark",
        )
        per_epoch = ", ".join(f"{row['val_accuracy']:.3f}" for row in result.history)
        trained = sum(row["train_images_per_second"] for row in result.history) / len(
            result.history
        )
        rates[name] = trained
        print(
            f"{name}: val accuracy per epoch [{per_epoch}], training {trained:.0f} img/s, {result.fit_seconds:.0f} s in all"
        )
    bare = bare_loop(args.image_size, args.batch_size, device)
    project = rates["parameter_transfer (full)"]
    print(f"bare loop: {bare:.0f} img/s")
    print(
        f"project: {project:.0f} img/s | bare loop: {bare:.0f} img/s | project/bare: {project / bare:.2f}"
    )


if __name__ == "__main__":
    main()
