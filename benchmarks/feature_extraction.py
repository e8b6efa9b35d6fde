"""Feature-extraction throughput: the project's extractor against a naive loop and the compute bound.

    python benchmarks/feature_extraction.py --data data/01_raw/cifar10_jpeg/test --image-size 64 --limit 10000

(a) project: transfer_learning.features.extraction.extract_features (cache off), end to end from files;
(b) naive:   torchvision ImageFolder + PIL transforms, DataLoader(num_workers=2), fp32 NCHW, batch 64;
(c) bound:   forward passes of the same network on random tensors already in memory: the best of
             both layouts and, on CPU, of one stream on all cores or one single-threaded stream
             per core (each stream running batches of the project's size).
This machine's speed drifts by ±15 % from minute to minute (a shared VM), so project and bound run
interleaved for --rounds rounds and the medians are compared.
The last line reads: project: X img/s | naive: Y img/s | bound: Z img/s | project/bound: R | project/naive: Q
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from transfer_learning.core.runtime import autocast_dtype, resolve_device, usable_cores
from transfer_learning.features.extraction import ExtractionSettings, extract_features
from transfer_learning.models.backbones import BackboneSettings, build_backbone


def image_files(root: str, limit: int) -> tuple[datasets.ImageFolder, list[int]]:
    folder = datasets.ImageFolder(root)
    # The first `limit` images across classes, in a fixed interleaved order (every class present).
    by_class: dict[int, list[int]] = {}
    for position, (_, label) in enumerate(folder.samples):
        by_class.setdefault(label, []).append(position)
    interleaved = [p for group in zip(*by_class.values(), strict=False) for p in group]
    return folder, interleaved[:limit]


def project(backbone, files: list[str], batch_size: int, device: torch.device) -> float:
    settings = ExtractionSettings(batch_size=batch_size, cache_dir=None, progress=False)
    result = extract_features(backbone, files, settings, device)
    return len(files) / result.seconds


def naive(backbone, folder, positions: list[int], device: torch.device) -> float:
    p = backbone.preprocessing
    folder.transform = transforms.Compose(
        [
            transforms.Resize(p.image_size),
            transforms.CenterCrop(p.image_size),
            transforms.ToTensor(),
            transforms.Normalize(p.mean, p.std),
        ]
    )
    loader = DataLoader(Subset(folder, positions), batch_size=64, num_workers=2)
    network = backbone.features.to(device).to(memory_format=torch.contiguous_format).eval()
    start = time.perf_counter()
    with torch.no_grad():
        for images, _ in loader:
            network(images.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(positions) / (time.perf_counter() - start)


def _forward_rate(
    network, batch, seconds: float, device: torch.device, dtype, _stream: int = 0
) -> int:
    """Images through `network` in `seconds`, one batch after another, in the calling thread."""
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
    ):
        for _ in range(3):
            network(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            network(batch)
            done += len(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return done


def bound(backbone, batch_size: int, device: torch.device, seconds: float = 10.0) -> float:
    """Best compute-only rate over layouts and, on CPU, over how the cores are used: one stream
    on every core, or one single-threaded stream per core (what the project's extractor does)."""
    size = backbone.preprocessing.image_size
    dtype = autocast_dtype(device)
    cores = torch.get_num_threads()
    best = 0.0
    for layout in (torch.channels_last, torch.contiguous_format):
        network = backbone.features.to(device).to(memory_format=layout).eval()
        batch = torch.randn(batch_size, 3, size, size, device=device).contiguous(
            memory_format=layout
        )
        start = time.perf_counter()
        best = max(
            best,
            _forward_rate(network, batch, seconds, device, dtype) / (time.perf_counter() - start),
        )
        if device.type == "cpu" and cores > 1:
            torch.set_num_threads(1)
            try:
                with ThreadPoolExecutor(cores) as pool:
                    start = time.perf_counter()
                    stream = partial(_forward_rate, network, batch, seconds, device, dtype)
                    done = sum(pool.map(stream, range(cores)))
                best = max(best, done / (time.perf_counter() - start))
            finally:
                torch.set_num_threads(cores)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", required=True, help="an image folder (one sub-folder per class)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=10000)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="project batch (default: 64 on CPU, 512 on GPU)",
    )
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    device = resolve_device(args.device)
    batch_size = args.batch_size or (512 if device.type == "cuda" else 64)
    if device.type == "cpu":
        torch.set_num_threads(usable_cores())
    backbone = build_backbone(BackboneSettings(name=args.backbone, image_size=args.image_size))
    folder, positions = image_files(args.data, args.limit)
    files = [folder.samples[p][0] for p in positions]
    card = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    print(
        f"{args.backbone} @ {args.image_size}px, {len(files)} images from {args.data}, device {device} ({card}), "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    project(backbone, files[: min(len(files), 4 * batch_size)], batch_size, device)  # warm-up
    project_rates, bound_rates = [], []
    for round_ in range(args.rounds):
        project_rates.append(project(backbone, files, batch_size, device))
        bound_rates.append(bound(backbone, batch_size, device))
        print(
            f"round {round_ + 1}: project {project_rates[-1]:.0f} img/s, bound {bound_rates[-1]:.0f} img/s"
        )
    naive_rate = naive(backbone, folder, positions, device)
    print(f"naive: {naive_rate:.0f} img/s")
    project_rate, bound_rate = statistics.median(project_rates), statistics.median(bound_rates)
    print(
        f"project: {project_rate:.0f} img/s | naive: {naive_rate:.0f} img/s | bound: {bound_rate:.0f} img/s"
        f" | project/bound: {project_rate / bound_rate:.2f} | project/naive: {project_rate / naive_rate:.2f}"
    )


if __name__ == "__main__":
    main()
